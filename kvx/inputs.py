"""What the user hands kvx as text or as a place to write: checked, with one-line errors.

Text must be UTF-8: a prompt with undecodable bytes would otherwise fail deep in the tokenizer (argv
and a POSIX-locale stdin smuggle them in as lone surrogates). Output paths are checked before any work,
so a run never fails at its end for want of a folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import BinaryIO, Iterator

from kvx.errors import KvxError


def check_utf8(text: str, what: str) -> str:
    """The text, unless it carries bytes that are not UTF-8 (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise KvxError(f"{what} is not UTF-8 text") from None
    return text


def decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KvxError(f"{what} is not UTF-8 text (byte {exc.start} cannot be decoded)") from None


def read_stdin(what: str = "the prompt on stdin") -> str:
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a replaced stdin (tests) is already text
        return check_utf8(sys.stdin.read(), what)
    return decode_utf8(stream.read(), what)


def read_text_file(source: str, what: str) -> str:
    """A UTF-8 text file's contents ('-' is stdin), or a one-line KvxError naming `what` and the path."""
    if source == "-":
        return read_stdin(f"{what} on stdin")
    path = Path(source).expanduser()
    if path.is_dir():
        raise KvxError(f"{what} file {source} is a folder")
    if not path.is_file():
        raise KvxError(f"{what} file not found: {source}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KvxError(f"cannot read {what} file {source}: {exc.strerror or exc}") from None
    return decode_utf8(data, f"{what} file {source}")


# JSON nested deeper than this would exhaust Python's recursion limit inside json.loads.
MAX_JSON_DEPTH = 500


def utf8_lines(stream: BinaryIO, what: str = "stdin", per_line: bool = False) -> Iterator:
    """The stream's lines as text; a line that is not UTF-8 (or JSON nested beyond MAX_JSON_DEPTH) stops
    the run with one line naming it — or, with per_line, is yielded as that KvxError so the caller can
    answer that line alone (`kvx generate --jsonl`: the other lines still run)."""
    for number, raw in enumerate(stream, start=1):
        try:
            line = decode_utf8(raw, f"{what} line {number}")
            if line.count("[") + line.count("{") > MAX_JSON_DEPTH and json_depth(line) > MAX_JSON_DEPTH:
                raise KvxError(f"{what} line {number} nests deeper than {MAX_JSON_DEPTH} levels")
        except KvxError as exc:
            if not per_line:
                raise
            yield exc
            continue
        yield line


def json_depth(text: str) -> int:
    """The deepest bracket nesting of JSON text, outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def check_writable(path: Path, option: str) -> None:
    """Fail before any work unless `path` can be created or replaced (its folder exists and is writable)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise KvxError(f"{option} {path} is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise KvxError(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise KvxError(f"{option} {path}: cannot write there (permission denied)")


class Output:
    """A text stream (stdout) whose write failures (a full disk, a closed terminal) are one-line errors.

    A closed pipe stays a BrokenPipeError: `kvx ... | head` ending early is not an error.
    """

    def __init__(self, stream, what: str = "standard output"):
        self.stream, self.what = stream, what

    def write(self, text: str) -> None:
        self._guard(self.stream.write, text)

    def flush(self) -> None:
        self._guard(self.stream.flush)

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            silence(self.stream)
            raise KvxError(f"cannot write to {self.what}: {exc.strerror or exc}") from None


def silence(stream) -> None:
    """Point the stream's file descriptor at /dev/null, so that the interpreter's last flush of what is
    still buffered cannot fail again (and print a second error) on the way out."""
    try:
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass

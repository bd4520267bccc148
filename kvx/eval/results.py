"""The eval's JSONL results file: resumable, and never left with a half-written line.

Each appended row rewrites the whole file to a temporary neighbour and renames it over the original
(os.replace is atomic), so an interrupted run leaves either the old file or the new one. Rewriting is
cheap next to the model work behind each row (a row costs at least one decode; the file is kilobytes
to a few megabytes).

Because each writer rewrites the file from its own copy, two runs writing one file would erase each
other's rows: `lock()` takes an exclusive advisory lock (a `.lock` neighbour, flock) for the life of the
process, and a second run on the same file stops at once with a clear error.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from kvx.errors import KvxError

# What identifies a row: a rerun skips every row whose key is already in the file.
KEY_FIELDS = ("task", "context", "haystack", "seed", "depth", "mode", "policy", "budget")


def row_key(row: dict) -> tuple:
    depth = row.get("depth")
    return (row["task"], int(row["context"]), row["haystack"], int(row["seed"]),
            None if depth is None else round(float(depth), 6), row["mode"], row["policy"], str(row["budget"]))


class ResultsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[dict] = []
        self._lines: list[str] = []
        if self.path.is_dir():
            raise KvxError(f"--out {self.path} is a folder; give a .jsonl file name")
        if self.path.exists():
            self._read()
        self.keys = {row_key(r) for r in self.rows}

    def lock(self) -> None:
        """Hold an exclusive lock on this results file until the process ends (POSIX; elsewhere a no-op)."""
        try:
            import fcntl
        except ImportError:
            return
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock_path, "a")
        except OSError as exc:
            raise KvxError(f"cannot write next to {self.path}: {exc}") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise KvxError(f"another kvx eval is writing {self.path}; wait for it or use another --out") from None
        self._lock_handle = handle  # kept open: the lock lasts as long as this object (or the process)
        # Rows the other run appended before we got the lock must not be erased by our first rewrite.
        self.rows, self._lines = [], []
        if self.path.exists():
            self._read()
        self.keys = {row_key(r) for r in self.rows}

    def _read(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KvxError(f"cannot read {self.path}: {exc}") from None
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise TypeError("not an object")
                hash(row_key(row))  # a key made of lists or objects could not index the rows
            except (KeyError, TypeError, ValueError, OverflowError, RecursionError):
                raise KvxError(f"{self.path} line {number} is not an eval result row; "
                               "use another --out or remove that line") from None
            self.rows.append(row)
            self._lines.append(line)

    def __contains__(self, key: tuple) -> bool:
        return key in self.keys

    def append(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False)
        lines = self._lines + [line]
        self._write("".join(f"{x}\n" for x in lines))
        self._lines = lines
        self.rows.append(row)
        self.keys.add(row_key(row))

    def _write(self, text: str) -> None:
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=folder)
        except OSError as exc:
            raise KvxError(f"cannot write {self.path}: {exc}") from None
        try:
            os.chmod(tmp, self.path.stat().st_mode & 0o777 if self.path.exists() else 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


def read_results(paths: list[str | Path]) -> tuple[list[dict], int]:
    """Every row of several results files, read together for a summary or a picture, and how many rows
    were replaced. A row whose key a later file also holds is replaced by the later file's (in place, so
    the policies keep the order they were first seen in): list the files oldest first and the newer
    measurement wins; the full cache's rows, which every run of a setting writes, count once."""
    rows: list[dict] = []
    where: dict[tuple, int] = {}
    replaced = 0
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise KvxError(f"{path}: no such results file")
        for row in ResultsFile(path).rows:
            key = row_key(row)
            if key in where:
                rows[where[key]] = row
                replaced += 1
            else:
                where[key] = len(rows)
                rows.append(row)
    return rows, replaced

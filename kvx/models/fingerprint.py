"""Fingerprints of a checkpoint and of its tokenizer: what a stored compressed context is checked against.

A context's keys and values mean something only to the weights that made them, and its questions only
to the tokenizer and chat template that split them from the context. Hashing a 16 GB checkpoint would
take minutes, so the model's fingerprint hashes what identifies it cheaply: config.json's bytes, and each
safetensors file's name, size and header (every tensor's name, dtype, shape and offsets, a few KB read
from the file's start). Two checkpoints with the same config and layout but different values (a
fine-tune saved with the same tool) collide; that is the price of not reading the weights, and it is
the same trade llama.cpp's and vLLM's caches make.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from kvx.errors import KvxError

# The tokenizer files that decide how text becomes ids, and how a question is wrapped (the chat template).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# A safetensors header is a little-endian u64 length, then that many bytes of JSON; none is anywhere
# near this (a 70B checkpoint's shard headers are tens of KB).
_MAX_HEADER = 64 << 20


def model_fingerprint(folder: str | Path) -> str:
    """sha256 over config.json and every safetensors file's name, size and header."""
    folder = Path(folder)
    h = hashlib.sha256(b"kvx-model/1\0")
    h.update(_read(folder / "config.json"))
    for path in sorted(folder.glob("*.safetensors")):
        h.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        h.update(_header(path))
    return h.hexdigest()


def tokenizer_fingerprint(folder: str | Path) -> str:
    """sha256 over tokenizer.json and tokenizer_config.json (the chat template lives there)."""
    folder = Path(folder)
    h = hashlib.sha256(b"kvx-tokenizer/1\0")
    for name in _TOKENIZER_FILES:
        path = folder / name
        h.update(name.encode() + b"\0")
        h.update(_read(path) if path.is_file() else b"(absent)")
    return h.hexdigest()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KvxError(f"cannot read {path}: {exc.strerror or exc}") from None


def _header(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < n <= _MAX_HEADER:
                raise KvxError(f"{path} is not a safetensors file (bad header length)")
            return f.read(n)
    except OSError as exc:
        raise KvxError(f"cannot read {path}: {exc.strerror or exc}") from None

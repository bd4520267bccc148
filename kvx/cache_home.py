"""Where kvx keeps what it makes once and reuses: converted models, built kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$KVX_HOME, else $XDG_CACHE_HOME/kvx, else ~/.cache/kvx."""
    if os.environ.get("KVX_HOME"):
        return Path(os.environ["KVX_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "kvx"
    return Path.home() / ".cache" / "kvx"

"""Helpers for the command-line tests (the `cli` fixture itself lives in conftest.py)."""

from __future__ import annotations


def error_line(result) -> str:
    """The one stderr line of a run that failed as a user error should: exit 2, no traceback, no stdout."""
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("kvx: error:"), err
    assert "Traceback" not in err and out == ""
    return lines[0]

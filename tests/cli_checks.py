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


def run_with_terminal_stderr(argv: list[str], stdin: str = "", timeout: int = 600) -> tuple[int, str, str]:
    """Run `python -m kvx *argv` with stderr on a pseudo-terminal (what a user at a shell sees) and stdin,
    stdout on pipes; returns (exit code, stdout, everything written to the terminal)."""
    import os
    import pty
    import subprocess
    import sys
    import threading

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "kvx", *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=slave, env={**os.environ, "COLUMNS": "200"})
    os.close(slave)
    seen = bytearray()

    def drain():  # a pty's buffer is small: read while the child writes, until it closes its end
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        out, _ = proc.communicate(stdin.encode(), timeout=timeout)
    finally:
        reader.join(timeout=30)
        os.close(master)
    return proc.returncode, out.decode(), seen.decode(errors="replace")

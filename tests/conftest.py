"""Fixtures shared by the command-line tests."""

from __future__ import annotations

import io
import sys

import pytest


@pytest.fixture
def cli(monkeypatch, capsys):
    """cli(*argv, stdin=b"") -> (exit code, stdout, stderr) of `kvx *argv`, run in this process through
    kvx.cli.main (the installed script's entry point) without paying for a fresh interpreter."""
    from kvx.cli import main

    def run(*argv, stdin: bytes = b""):
        monkeypatch.setattr(sys, "argv", ["kvx", *map(str, argv)])
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return run

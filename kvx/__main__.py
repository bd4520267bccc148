"""`python -m kvx` is the `kvx` command."""

from kvx.cli import main

main()

"""One module per `kvx` subcommand that is more than a few lines (registered in kvx/cli.py)."""

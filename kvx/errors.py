"""User-facing errors.

Anything the user can fix (a bad path, a bad budget, a corrupt file) is raised as KvxError with a
one-line message; the CLI prints it to stderr and exits with code 2, never with a traceback.
"""

from contextlib import contextmanager


class KvxError(Exception):
    """An error the user caused and can fix; its message is one line, shown as is."""


@contextmanager
def about(option: str):
    """Errors raised inside name the option they come from: `--budget: invalid budget 'x'; ...`."""
    try:
        yield
    except KvxError as exc:
        if str(exc).startswith(option):
            raise
        raise KvxError(f"{option}: {exc}") from None

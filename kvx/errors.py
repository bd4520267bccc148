"""User-facing errors.

Anything the user can fix (a bad path, a bad budget, a corrupt file) is raised as KvxError with a
one-line message; the CLI prints it to stderr and exits with code 2, never with a traceback.
"""


class KvxError(Exception):
    """An error the user caused and can fix; its message is one line, shown as is."""

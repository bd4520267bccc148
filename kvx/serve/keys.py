"""Where the server's API keys come from, and whether a bind address is reachable from other machines.

Keys are the union of --api-key (repeatable), the lines of --api-key-file (blank lines and `#` comments
skipped) and KVX_API_KEY. They are checked before the model loads, so an unreadable or empty key file is a
one-line error at once rather than a server that would have accepted everyone.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence

from kvx.errors import KvxError

ENV_VAR = "KVX_API_KEY"


def _checked(key: str, where: str) -> str:
    key = key.strip()
    if not key:
        raise KvxError(f"{where}: an API key is empty")
    # The key travels in an HTTP header: whitespace or control characters would never match.
    if any(c.isspace() or not c.isprintable() for c in key):
        raise KvxError(f"{where}: an API key must not contain spaces or control characters")
    return key


def read_key_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise KvxError(f"--api-key-file: cannot read {path} ({reason})") from None
    keys = [_checked(line, "--api-key-file") for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise KvxError(f"--api-key-file: {path} holds no key (one key per line)")
    return keys


def collect_keys(api_keys: Sequence[str] = (), api_key_file: str | None = None,
                 environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """Every accepted key, in a stable order without repeats; () when none is set (an open server)."""
    keys = [_checked(k, "--api-key") for k in api_keys]
    if api_key_file is not None:
        keys += read_key_file(api_key_file)
    if environ.get(ENV_VAR, "").strip():
        keys.append(_checked(environ[ENV_VAR], ENV_VAR))
    return tuple(dict.fromkeys(keys))


def metrics_key(value: str | None) -> str | None:
    return None if value is None else _checked(value, "--metrics-key")


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to any interface


def public_bind_warning(host: str, keys: Sequence[str]) -> str | None:
    """One line to print when the server listens beyond this machine with no key, else None."""
    if keys or is_loopback(host):
        return None
    return (f"kvx: warning: listening on {host} without an API key: anyone who can reach this port can use the "
            f"model (set --api-key, --api-key-file or {ENV_VAR})")

"""Bearer keys: an ASGI middleware in front of every route.

With keys set, every route but /health needs `Authorization: Bearer KEY` (the /v1 API, /tokenize,
/detokenize, the OpenAPI docs); /metrics needs the --metrics-key when one is set, and is open otherwise
(so a Prometheus scraper never holds an API key). The check runs before the body is read: a client
without a key costs no parsing. Keys are compared with hmac.compare_digest against every accepted key, so
the time taken says nothing about how much of a key was right.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence

from kvx.serve.errors import ApiError

OPEN_PATHS = frozenset({"/health"})
METRICS_PATH = "/metrics"


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key of an `Authorization: Bearer KEY` header, or None."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").strip().partition(" ")
            return key.strip() if scheme.lower() == "bearer" and key.strip() else None
    return None


def matches(key: str | None, accepted: Sequence[str]) -> bool:
    if key is None:
        return False
    given = key.encode()
    ok = False
    for k in accepted:  # no early exit: every accepted key is compared
        ok |= hmac.compare_digest(given, k.encode())
    return ok


def refusal(key: str | None) -> ApiError:
    message = ("this server needs an API key: send `Authorization: Bearer KEY`" if key is None
               else "the API key is not valid")
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class BearerAuth:
    def __init__(self, app, keys: Sequence[str], metrics_key: str | None = None,
                 on_refused: Callable[[], None] | None = None):
        self.app = app
        self.keys = tuple(keys)
        self.metrics_keys = (metrics_key,) if metrics_key else ()
        self.on_refused = on_refused

    def _needed(self, path: str) -> tuple[str, ...]:
        if path in OPEN_PATHS:
            return ()
        if path == METRICS_PATH:
            return self.metrics_keys
        return self.keys

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            accepted = self._needed(scope["path"])
            if accepted:
                key = presented_key(scope["headers"])
                if not matches(key, accepted):
                    if self.on_refused is not None:
                        self.on_refused()
                    await refusal(key).response()(scope, receive, send)
                    return
        await self.app(scope, receive, send)

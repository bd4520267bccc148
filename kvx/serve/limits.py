"""Limits on what a client can make the server hold: an ASGI middleware that reads each request body
before any route sees it.

- A body over --max-body-bytes is a 413 before a byte of it is parsed: at once when Content-Length says
  so, else as soon as the bytes received pass the limit (a chunked upload), so the server never buffers
  more than the limit.
- A client that takes longer than --client-timeout seconds to send its whole body (a stalled or
  deliberately slow upload) gets a 408 and its connection is closed; it holds no request meanwhile,
  because nothing is queued before the body is complete.

The body read here is replayed to the route unchanged; later receives (a disconnect) pass through.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from kvx.serve.errors import ApiError

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server's limit of {_size(limit)} "
                    "(kvx serve --max-body-bytes)", code="request_too_large")


def too_slow(timeout: float) -> ApiError:
    return ApiError(408, f"the request body did not arrive within {timeout:g} s (kvx serve --client-timeout)",
                    code="request_timeout", headers={"Connection": "close"})


def _content_length(headers) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodyLimit:
    def __init__(self, app, max_bytes: int, timeout: float, on_refused: Callable[[int], None] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.on_refused = on_refused

    async def _refuse(self, err: ApiError, scope, receive, send) -> None:
        if self.on_refused is not None:
            self.on_refused(err.status)
        await err.response()(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope["headers"])
        if declared is not None and declared > self.max_bytes:
            await self._refuse(too_large(self.max_bytes), scope, receive, send)
            return
        chunks, size = [], 0
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await self._refuse(too_slow(self.timeout), scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return  # the client is gone: nobody to answer, nothing was queued
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(too_large(self.max_bytes), scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

"""A connection that has not sent a complete request head within --client-timeout is closed.

uvicorn's h11 protocol times out only idle keep-alive connections, and only after a response: a client that
connects and sends nothing, or sends part of a request line or headers and stalls (slowloris), holds its
connection for good, and the body limits (limits.py) never see it, since the app is called only once the
headers are complete. This protocol, given to uvicorn as its `http` class (uvicorn's own extension point),
arms a timer when a connection opens and whenever bytes of a new request head are waiting, and cancels it
once h11 has parsed the head (the request is then the app's, and --client-timeout governs its body).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderTimeoutProtocol(H11Protocol):
    header_timeout: float = 30.0  # set per server: a subclass with --client-timeout (with_header_timeout)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._arm()  # part of a new request's head is waiting
        elif self.conn.their_state is not h11.IDLE:
            self._disarm()  # the head is complete: the app has the request

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        # Still no complete head (a request that arrived since is the app's: leave it be).
        if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
            if not self.transport.is_closing():
                self.transport.close()


def with_header_timeout(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class for one server: its heads must arrive within `seconds`."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": float(seconds)})

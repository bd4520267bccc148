"""/metrics: the engine's state in Prometheus' text exposition format (version 0.0.4).

The engine thread publishes a snapshot after every step; the event loop only formats the latest one, so a
scrape never waits for the model.
"""

from __future__ import annotations

import time
from collections import deque

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name, type, help, snapshot key
_METRICS = [
    ("kvx_requests_running", "gauge", "Requests admitted to the batch (prefilling or decoding).", "running"),
    ("kvx_requests_waiting", "gauge", "Requests accepted and waiting for KV memory or a batch slot.", "queued"),
    ("kvx_kv_blocks_total", "gauge", "Blocks in the shared KV pool.", "blocks_total"),
    ("kvx_kv_blocks_used", "gauge", "KV blocks holding entries of running requests.", "blocks_used"),
    ("kvx_kv_blocks_free", "gauge", "KV blocks on the free list.", "blocks_free"),
    ("kvx_kv_blocks_reserved", "gauge", "KV blocks promised to admitted requests (held or still to come).",
     "blocks_reserved"),
    ("kvx_kv_bytes_total", "gauge", "K+V bytes of the whole pool (--kv-memory, rounded down to blocks).",
     "bytes_total"),
    ("kvx_kv_bytes_held", "gauge", "K+V bytes held by running requests.", "bytes_used"),
    ("kvx_tokens_per_second", "gauge", "Output tokens per second over the last 10 seconds.", "tokens_per_s"),
    ("kvx_generated_tokens_total", "counter", "Output tokens generated since the server started.",
     "generated_tokens"),
    ("kvx_prompt_tokens_total", "counter", "Prompt tokens of the requests accepted since the server started.",
     "prompt_tokens"),
]
_OUTCOMES = ("finished", "cancelled", "failed", "rejected")


class RateMeter:
    """A running total's rate over the last `window` seconds."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, total: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._samples.append((now, total))
        # Keep one sample at or before the window's start, so the rate spans the whole window.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def render(snapshot: dict, outcomes: dict[str, int]) -> str:
    lines = []
    for name, kind, help_text, key in _METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_num(snapshot.get(key, 0))}"]
    lines += ["# HELP kvx_requests_total Requests by outcome (rejected: refused before running, e.g. queue full).",
              "# TYPE kvx_requests_total counter"]
    lines += [f'kvx_requests_total{{outcome="{o}"}} {outcomes.get(o, 0)}' for o in _OUTCOMES]
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(int(value))


def parse(text: str) -> dict[str, float]:
    """Metric lines back to {name or name{labels}: value} (for tests and the load benchmark)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out

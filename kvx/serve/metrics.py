"""/metrics through prometheus_client, named after vLLM's metrics with a `kvx:` prefix, so dashboards
built for `vllm:` need only the prefix changed.

Each server has its own CollectorRegistry (not the process-wide one), so several servers can live in one
process (tests) without their series colliding. Two kinds of series:
- read at scrape time from the engine thread's latest snapshot (gauges of the pool and the queue, token
  counters): a scrape never waits for the model and never touches the engine;
- observed as requests progress (latency histograms, requests by finish reason, errors, rejections):
  prometheus_client's metrics are thread-safe, so the engine thread and the event loop both observe.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Bucket edges in seconds: log-spaced over what a CPU with a small model and a GPU with a large one give.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                 10.0, 20.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)

# The engine's finish reasons as the API (and vLLM's finished_reason label) names them.
FINISHED_REASON = {"eos": "stop", "stop": "stop", "length": "length"}
ABORT = "abort"  # the client went away before the answer ended

# An error answer's HTTP status -> the `kind` label of kvx:request_errors_total (a fixed, small set).
ERROR_KIND = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              408: "client_timeout", 413: "body_too_large", 500: "server_error", 503: "shutting_down"}


def error_kind(status: int) -> str:
    return ERROR_KIND.get(status, f"http_{status}")


class _EngineCollector:
    """Series computed from the engine thread's latest snapshot at each scrape."""

    # name, help, snapshot key (gauges)
    GAUGES = [
        ("kvx:num_requests_running", "Requests admitted to the batch (prefilling or decoding).", "running"),
        ("kvx:num_requests_waiting", "Requests accepted and waiting for KV memory or a batch slot.", "queued"),
        ("kvx:kv_blocks_total", "Blocks in the shared KV pool.", "blocks_total"),
        ("kvx:kv_blocks_used", "KV blocks holding entries of running requests.", "blocks_used"),
        ("kvx:kv_blocks_free", "KV blocks on the free list.", "blocks_free"),
        ("kvx:kv_blocks_reserved", "KV blocks promised to admitted requests (held or still to come).",
         "blocks_reserved"),
        ("kvx:kv_cache_bytes_total", "K+V bytes of the whole pool (--kv-memory, rounded down to blocks).",
         "bytes_total"),
        ("kvx:kv_cache_bytes_held", "K+V bytes held by running requests (their blocks).", "bytes_used"),
        ("kvx:kv_cache_bytes_full", "K+V bytes a full cache of the running requests' tokens (prompt and output "
         "so far) would hold: with kvx:kv_cache_bytes_held, what compression saves.", "bytes_full"),
        ("kvx:tokens_per_second", "Output tokens per second over the last 10 seconds.", "tokens_per_s"),
    ]
    COUNTERS = [
        ("kvx:prompt_tokens", "Prompt tokens of the requests accepted since the server started.", "prompt_tokens"),
        ("kvx:generation_tokens", "Output tokens generated since the server started.", "generated_tokens"),
    ]

    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def collect(self):
        s = self.snapshot()
        for name, help_text, key in self.GAUGES:
            yield GaugeMetricFamily(name, help_text, value=float(s.get(key, 0)))
        total = s.get("blocks_total", 0)
        yield GaugeMetricFamily("kvx:kv_cache_usage_perc", "Fraction of the KV pool's blocks in use, 0 to 1 (what "
                                "vLLM's gpu_cache_usage_perc / kv_cache_usage_perc report).",
                                value=s.get("blocks_used", 0) / total if total else 0.0)
        for name, help_text, key in self.COUNTERS:
            yield CounterMetricFamily(name, help_text, value=float(s.get(key, 0)))
        if "ranks" in s:  # kvx serve --tensor-parallel: each rank's pool (its own kv heads' blocks)
            for name, help_text, key in self.RANK_GAUGES:
                family = GaugeMetricFamily(name, help_text, labels=["rank"])
                for rank, pool in enumerate(s["ranks"]):
                    family.add_metric([str(rank)], float(pool.get(key, 0)))
                yield family

    RANK_GAUGES = [
        ("kvx:rank_kv_blocks_total", "Blocks in a tensor-parallel rank's KV pool.", "blocks_total"),
        ("kvx:rank_kv_blocks_used", "KV blocks a rank's running requests hold (its kv heads only).", "blocks_used"),
        ("kvx:rank_kv_blocks_reserved", "KV blocks promised on a rank to admitted requests.", "blocks_reserved"),
        ("kvx:rank_kv_cache_bytes_held", "K+V bytes a rank's running requests hold.", "bytes_used"),
    ]


class _ContextCollector:
    """Stored contexts: how many, their bytes by tier, hits and loads (kvx's own series)."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        yield GaugeMetricFamily("kvx:contexts", "Stored compressed contexts (POST /v1/contexts) held.",
                                value=s.get("contexts", 0))
        tiers = GaugeMetricFamily("kvx:context_bytes", "Bytes of stored contexts by tier: pool (K+V blocks held "
                                  "in the KV pool, once however many requests share them), host (kept entries in "
                                  "host memory), disk (their .kvc files).", labels=["tier"])
        for tier in ("pool", "host", "disk"):
            tiers.add_metric([tier], s.get(f"bytes_{tier}", 0))
        yield tiers
        yield CounterMetricFamily("kvx:context_hits", "Requests answered from a stored context (kv_context).",
                                  value=s.get("hits", 0))
        yield CounterMetricFamily("kvx:context_loads", "Times a stored context was written into the KV pool "
                                  "(first use, or again after admission unloaded it).", value=s.get("loads", 0))
        yield CounterMetricFamily("kvx:context_load_seconds", "Seconds spent loading stored contexts into the pool "
                                  "(from host memory or their file).", value=s.get("load_s", 0.0))


class ServeMetrics:
    """One server's registry and the series observed as requests progress."""

    def __init__(self, snapshot: Callable[[], dict]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("kvx:time_to_first_token_seconds", "From the request's arrival to its first output "
                              "token.", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("kvx:inter_token_latency_seconds", "Between two consecutive output tokens of a "
                             "request.", buckets=TOKEN_BUCKETS, registry=r)
        self.tpot = Histogram("kvx:request_time_per_output_token_seconds", "A finished request's decode time per "
                              "output token after the first (vLLM's time_per_output_token).", buckets=TOKEN_BUCKETS,
                              registry=r)
        self.e2e = Histogram("kvx:e2e_request_latency_seconds", "From a finished request's arrival to its last "
                             "token.", buckets=E2E_BUCKETS, registry=r)
        self.success = Counter("kvx:request_success", "Requests that ended, by finished_reason (stop, length; abort: "
                               "the client went away).", ["finished_reason"], registry=r)
        self.errors = Counter("kvx:request_errors", "Requests answered with an error, by kind (invalid_request, "
                              "unauthorized, body_too_large, server_error, ...).", ["kind"], registry=r)
        self.rejections = Counter("kvx:queue_rejections", "Requests refused with 429 because --max-queue requests "
                                  "were already waiting.", registry=r)
        for reason in ("stop", "length", ABORT):  # present at 0 from the start, so rates work at once
            self.success.labels(reason)
        r.register(_EngineCollector(snapshot))

    def watch_contexts(self, stats: Callable[[], dict]) -> None:
        """Series of the stored contexts (serve/contexts.py), read from `stats()` at each scrape."""
        self.registry.register(_ContextCollector(stats))

    def error(self, status: int) -> None:
        self.errors.labels(error_kind(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


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


def parse(text: str) -> dict[str, float]:
    """/metrics text -> {sample name, or name{label="value",...} with labels sorted: value}, read by
    prometheus_client's own parser (tests and the load benchmark)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out

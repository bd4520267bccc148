"""What `kvx serve` is started with, and what every request inherits from it.

Imports nothing heavy: the command line reads these defaults without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_QUEUE = 128
DEFAULT_MAX_TOKENS = 256  # as `kvx generate`: a request that sets no max_tokens gets this many at most
DEFAULT_MAX_BODY_BYTES = 4 << 20  # 4 MiB: ~1M tokens of text, far past any context kvx serves
DEFAULT_CLIENT_TIMEOUT = 60.0  # seconds a client may take to send its body, or to take a streamed chunk
DEFAULT_KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open (uvicorn's default)


@dataclass(frozen=True)
class RequestDefaults:
    """The server's flags as the defaults of a request's fields (kv_* and max_tokens)."""

    policy: str = "full"
    budget: str | None = None
    allocation: str | None = None
    policy_args: tuple[str, ...] = ()
    max_tokens: int = DEFAULT_MAX_TOKENS


@dataclass
class ServeSettings:
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "full"
    budget: str | None = None
    allocation: str | None = None
    policy_args: list[str] = field(default_factory=list)
    max_batch: int | None = None  # None: the batched engine's default (kvx.runtime.engine.batch_engine)
    kv_memory: str | None = None  # None: options.default_kv_memory(device)
    max_queue: int = DEFAULT_MAX_QUEUE
    max_tokens: int = DEFAULT_MAX_TOKENS
    prefill_chunk: int | None = None
    prefill_step: int | None = None  # None: the device's default (kvx.runtime.compression.split_prefill)
    use_graphs: bool = True  # GPU: replay the batched decode step as CUDA graphs (--no-graph: eager)
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish on Ctrl-C / SIGTERM
    log_level: str = "info"
    api_keys: list[str] = field(default_factory=list)  # --api-key (KVX_API_KEY is read when keys are collected)
    api_key_file: str | None = None
    metrics_key: str | None = None  # None: /metrics is open
    max_body_bytes: int | str = DEFAULT_MAX_BODY_BYTES  # a number of bytes, or a size like "4MiB"
    client_timeout: float = DEFAULT_CLIENT_TIMEOUT
    timeout_keep_alive: int = DEFAULT_KEEP_ALIVE
    tensor_parallel: int = 1  # ranks the model and its cache are split over (runtime/parallel)
    context_dir: str | None = None  # stored contexts persist here as .kvc files (None: in memory only)
    context_memory: int | str = 2 << 30  # host bytes of stored contexts' entries (serve/contexts.py)

    def defaults(self) -> RequestDefaults:
        return RequestDefaults(self.policy, self.budget, self.allocation, tuple(self.policy_args), self.max_tokens)

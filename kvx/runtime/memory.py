"""Byte accounting: the planner behind `kvx profile --plan` and human-readable sizes.

Everything here is computed from a ModelConfig alone (no weights): it answers "will it fit?" before any
download. The measured report (`kvx profile` without --plan) must agree with it; tests check that.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from kvx.errors import KvxError
from kvx.models.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'80GiB', '80GB', '1.5TiB', '123456' -> bytes."""
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise KvxError(f"cannot read memory size {text!r}: use e.g. 80GiB, 24GB or a number of bytes")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise KvxError(f"memory size must be positive, got {text!r}")
    return int(value)


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> int:
    """K and V bytes one token occupies across all layers and kv heads: 2 * L * Hkv * d * bytes."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


def parameter_count(cfg: ModelConfig) -> int:
    D, d, H, Hkv, F, V = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                          cfg.intermediate_size, cfg.vocab_size)
    attn = D * H * d + 2 * D * Hkv * d + H * d * D
    if cfg.qkv_bias:
        attn += H * d + 2 * Hkv * d
    if getattr(cfg, "o_bias", False):
        attn += D
    norms = 2 * D + (2 * d if cfg.qk_norm else 0)
    per_layer = attn + 3 * D * F + norms
    embed = V * D * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_layers * per_layer + embed + D


@dataclass
class Plan:
    architecture: str
    dtype: str
    context: int
    batch: int
    budget: str | None
    kv_bytes_per_token: int
    weight_bytes: int
    kv_bytes_full: int  # batch * context tokens, uncompressed
    kv_entries_full: int
    kv_entries_kept: int  # after compression (per sequence * batch)
    kv_bytes_kept: int  # kept entries only
    kv_bytes_held: int  # kept + decode headroom, what the cache allocates after compression
    headroom_tokens: int
    kv_bytes_peak_prefill: int  # the prompt is prefilled whole, then compressed: peak holds the full cache
    memory: int | None = None
    max_context_full: int | None = None  # at batch 1, uncompressed
    max_context_budget: int | None = None  # at batch 1, held after compression (prefill peak aside)
    max_batch_full: int | None = None  # at `context`
    max_batch_budget: int | None = None
    model_context: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def plan(cfg: ModelConfig, context: int, batch: int = 1, budget=None, dtype: str = "bfloat16",
         memory: int | None = None, headroom_tokens: int = 0) -> Plan:
    """KV and weight bytes of `batch` sequences of `context` tokens, and what fits in `memory`."""
    if dtype not in DTYPE_BYTES:
        raise KvxError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    if context <= 0 or batch <= 0:
        raise KvxError("--context and --batch must be positive")
    nbytes = DTYPE_BYTES[dtype]
    per_token = kv_bytes_per_token(cfg, nbytes)
    entry = 2 * cfg.head_dim * nbytes
    L, Hkv = cfg.num_layers, cfg.num_kv_heads
    weights = parameter_count(cfg) * nbytes
    entries_full = L * Hkv * context
    if budget is None or budget.keeps_everything(context):
        kept = entries_full
    else:
        kept = budget.total_entries(context, L, Hkv)
        if kept <= 0:
            raise KvxError(f"budget {budget} keeps nothing of a {context}-token context")
    held_entries = kept + L * Hkv * headroom_tokens
    p = Plan(
        architecture=cfg.architecture, dtype=dtype, context=context, batch=batch,
        budget=None if budget is None else str(budget), kv_bytes_per_token=per_token, weight_bytes=weights,
        kv_bytes_full=per_token * context * batch, kv_entries_full=entries_full * batch,
        kv_entries_kept=kept * batch, kv_bytes_kept=kept * entry * batch,
        kv_bytes_held=held_entries * entry * batch, headroom_tokens=headroom_tokens,
        kv_bytes_peak_prefill=max(per_token * context, held_entries * entry) * batch,
        memory=memory, model_context=cfg.max_position_embeddings,
    )
    if memory is not None:
        free = memory - weights
        if free <= 0:
            raise KvxError(f"memory {human_bytes(memory)} is smaller than the weights ({human_bytes(weights)})")
        p.max_context_full = free // per_token
        if budget is None:
            p.max_context_budget = p.max_context_full
        elif budget.fraction is not None:
            p.max_context_budget = int(free // (per_token * budget.fraction))
        # A per-head token budget holds the same bytes at any context: no bound after compression (None).
        p.max_batch_full = free // (per_token * context)
        p.max_batch_budget = free // max(1, held_entries * entry)
    return p

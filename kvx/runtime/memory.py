"""Byte accounting: the planner behind `kvx profile --plan` and human-readable sizes.

Everything here is computed from a ModelConfig alone (no weights): it answers "will it fit?" before any
download. It follows what kvx's runtime really allocates, so the measured report (`kvx profile` without
--plan) agrees with it; tests check that:

- the cache keeps every token of the prompt (a sliding window masks attention, it does not trim the cache);
- compression keeps `Budget.total_entries` (layer, kv head, token) entries, and each kv head's segment is
  reallocated to its kept tokens plus `headroom_tokens` free slots for decoding;
- the planner assumes the prompt is prefilled whole before it is compressed, so while a sequence is
  prefilled its full cache exists: the budget shrinks what is held afterwards, not the prefill peak.
  Sequences are prefilled one at a time, each compressed before the next.

The check before a prefill (`check_fits` over a `Need`) counts what the engine's scheduler reserves for the
request (scheduler.worst_case_blocks: blocks x the bytes a block occupies) and, on a GPU, the prefill
activations; `kvx generate` calls it through kvx.options.check_memory.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Callable

from kvx.errors import KvxError
from kvx.runtime.cache.pool import DEFAULT_BLOCK_SIZE
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
    m = _SIZE.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise KvxError(f"cannot read memory size {text!r}: use e.g. 80GiB, 24GB or a number of bytes")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise KvxError(f"memory size must be at least one byte, got {text!r}")
    return int(value)


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> int:
    """K and V bytes one token occupies across all layers and kv heads: 2 * L * Hkv * d * bytes."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of the checkpoint as Hugging Face counts them (a tied LM head counted once)."""
    D, d, H, Hkv, F, V = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                          cfg.intermediate_size, cfg.vocab_size)
    attn = D * H * d + 2 * D * Hkv * d + H * d * D
    if cfg.qkv_bias:
        attn += H * d + 2 * Hkv * d
    if cfg.o_bias:
        attn += D
    norms = 2 * D + (2 * d if cfg.qk_norm else 0)
    per_layer = attn + 3 * D * F + norms
    embed = V * D * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_layers * per_layer + embed + D


@dataclass
class Fits:
    """What fits in `memory` once the weights are loaded. None: no memory bound (a per-head token budget
    holds the same bytes at any context)."""

    memory: int
    free: int  # memory - weights
    max_context_full: int  # batch 1, uncompressed (plus decode headroom)
    max_context_budget: int  # batch 1, compressed, counting the whole-prompt prefill peak
    max_context_held: int | None  # batch 1, counting only what is held after compression (chunked prefill)
    max_batch_full: int  # at `context`, uncompressed
    max_batch_budget: int  # at `context`, compressed, sequences prefilled one at a time
    max_batch_held: int  # at `context`, counting only what is held after compression
    # The batched engine (kvx generate --jsonl, kvx serve): the same memory as a pool of blocks, admitting a
    # request only when its worst case fits (a compressed one reserves its prefill until it is compressed).
    block_size: int = 0
    max_batch_pool_full: int = 0
    max_batch_pool_budget: int = 0


@dataclass
class Plan:
    architecture: str
    dtype: str
    context: int
    batch: int
    budget: str | None
    headroom_tokens: int  # free slots per (layer, kv head) kept for decoding
    model_context: int
    num_layers: int
    num_kv_heads: int
    parameters: int
    weight_bytes: int
    kv_bytes_per_token: int
    entry_bytes: int  # K + V of one (layer, kv head, token) entry
    kv_entries_full: int  # batch * context tokens, uncompressed
    kv_bytes_full: int
    kv_entries_kept: int  # after compression, all sequences
    kv_bytes_kept: int
    kv_slots_held: int  # kept + headroom: what the cache allocates after compression
    kv_bytes_held: int
    kv_bytes_headroom: int
    kv_bytes_peak_prefill: int  # (batch - 1) sequences held + one sequence's whole prompt
    fits: Fits | None = None
    weight_format: str | None = None  # the CPU's packed linear weights (int8, ...), None: weights in `dtype`

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_plan_dtype(dtype: str, cfg: ModelConfig) -> str:
    """'auto' is the checkpoint's own dtype (bfloat16 when it names none kvx knows)."""
    if dtype == "auto":
        return cfg.torch_dtype if cfg.torch_dtype in DTYPE_BYTES else "bfloat16"
    if dtype not in DTYPE_BYTES:
        raise KvxError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return dtype


def kept_entries(cfg: ModelConfig, context: int, budget) -> int:
    """(layer, kv head, token) entries one sequence keeps after compression: what Policy.select keeps."""
    entries = cfg.num_layers * cfg.num_kv_heads * context
    if budget is None or budget.keeps_everything(context):
        return entries
    if budget.fraction is not None and budget.fraction * entries < 0.5:
        raise KvxError(f"budget {budget} keeps nothing of the {entries} KV entries of a {context}-token context")
    return budget.total_entries(context, cfg.num_layers, cfg.num_kv_heads)


def packed_weight_bytes(cfg: ModelConfig, fmt: str) -> int:
    """The weight bytes of a model whose linear matrices (and LM head) are packed as `fmt` on the CPU
    (models/cpu_weights.py: int8, bfloat16, w8a8), everything else float32: the packed matrices, one scale
    per output row, and the rest of the parameters (the embedding, which a tied head keeps, norms, biases)."""
    from kvx.models.weight_bytes import packed_bytes_per_element, stacked_norm_copies

    D, d, H, Hkv, F, V = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                          cfg.intermediate_size, cfg.vocab_size)
    elements = cfg.num_layers * ((H + 2 * Hkv) * d * D + D * H * d + 2 * F * D + D * F) + V * D
    rows = cfg.num_layers * ((H + 2 * Hkv) * d + D + 2 * F + D) + V
    cols = cfg.num_layers * (D + H * d + D + F) + D  # each matrix's inputs (w8a8's smoothing, its anchor row)
    per_element, per_row = packed_bytes_per_element(fmt)
    rest = parameter_count(cfg) - elements + (V * D if cfg.tie_word_embeddings else 0) + stacked_norm_copies(cfg)
    smoothing = 2 * 4 * cols if fmt == "w8a8" else 0
    return elements * per_element + rows * per_row + smoothing + rest * 4


def plan(cfg: ModelConfig, context: int, batch: int = 1, budget=None, dtype: str = "bfloat16",
         memory: int | None = None, headroom_tokens: int = 0, weight_format: str | None = None,
         head_adaptive: bool = False) -> Plan:
    """KV and weight bytes of `batch` sequences of `context` tokens, and what fits in `memory`.
    weight_format: the CPU's packed linear weights (int8, ...; `dtype` is then the activations' and the
    cache's), None when the weights are in `dtype` too. head_adaptive: the policy's allocator may give the
    heads of a layer different counts (on a tensor-parallel rank's share, cfg from largest_share, a
    device may then hold up to the whole budget: scheduler.kept_on_rank)."""
    if dtype not in DTYPE_BYTES:
        raise KvxError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    if context <= 0:
        raise KvxError(f"--context must be a positive number of tokens, got {context}")
    if batch <= 0:
        raise KvxError(f"--batch must be a positive number of sequences, got {batch}")
    if headroom_tokens < 0:
        raise KvxError(f"--decode-steps cannot be negative, got {headroom_tokens}")
    nbytes = DTYPE_BYTES[dtype]
    heads = cfg.num_layers * cfg.num_kv_heads
    entry = 2 * cfg.head_dim * nbytes
    per_token = kv_bytes_per_token(cfg, nbytes)
    params = parameter_count(cfg)
    if weight_format in (None, "float32"):
        from kvx.models.weight_bytes import stacked_norm_copies

        weights = (params + stacked_norm_copies(cfg)) * nbytes  # the bytes kvx holds (Qwen3's stacked norms)
    else:
        weights = packed_weight_bytes(cfg, weight_format)
    sizes = _SequenceBytes(heads, entry, budget, cfg, headroom_tokens, head_adaptive)
    kept = kept_entries(cfg, context, budget)  # a rank's even share of the budget
    compressing = budget is not None and not budget.keeps_everything(context)
    held_kept = sizes.kept(context) if compressing else kept  # what admission counts (more on a rank)
    held_one, full_one = sizes.held(context), sizes.full(context)
    p = Plan(
        architecture=cfg.architecture, dtype=dtype, context=context, batch=batch,
        budget=None if budget is None else str(budget), headroom_tokens=headroom_tokens,
        model_context=cfg.max_position_embeddings, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
        parameters=params, weight_bytes=weights, kv_bytes_per_token=per_token, entry_bytes=entry,
        kv_entries_full=heads * context * batch, kv_bytes_full=per_token * context * batch,
        kv_entries_kept=kept * batch, kv_bytes_kept=kept * entry * batch,
        kv_slots_held=(held_kept + heads * headroom_tokens) * batch, kv_bytes_held=held_one * batch,
        kv_bytes_headroom=heads * headroom_tokens * entry * batch,
        kv_bytes_peak_prefill=(batch - 1) * held_one + sizes.prefill_peak(context),
        weight_format=None if weight_format == "float32" else weight_format,
    )
    if memory is not None:
        p.fits = _fits(sizes, context, memory, weights)
    return p


@dataclass
class _SequenceBytes:
    """KV bytes of one sequence as functions of its context length."""

    heads: int
    entry: int
    budget: object
    cfg: ModelConfig
    headroom: int
    head_adaptive: bool = False

    def full(self, context: int) -> int:
        """Uncompressed, with decode headroom (the cache an uncompressed run allocates)."""
        return self.heads * (context + self.headroom) * self.entry

    def held(self, context: int) -> int:
        if self.budget is None or self.budget.keeps_everything(context):
            return self.full(context)
        return (self.kept(context) + self.heads * self.headroom) * self.entry

    def kept(self, context: int) -> int:
        """Entries one compressed sequence holds on this device: on a tensor-parallel rank's share
        (largest_share) what admission counts (scheduler.kept_on_rank)."""
        from kvx.runtime.engine.scheduler import kept_on_rank

        if self.cfg.model_kv_heads and self.cfg.model_kv_heads != self.cfg.num_kv_heads:
            return kept_on_rank(self.cfg, context, self.budget, self.head_adaptive)
        return self.budget.total_entries(context, self.cfg.num_layers, self.cfg.num_kv_heads)

    def pool_batches(self, context: int, free: int) -> tuple[int, int]:
        """(full, compressed) sequences of `context` tokens the batched engine runs at once in `free` bytes."""
        from kvx.runtime.engine.scheduler import compressed_blocks, full_blocks

        B = DEFAULT_BLOCK_SIZE
        blocks = free // (B * self.entry)
        full = full_blocks(self.heads, B, context + self.headroom)
        if self.budget is None or self.budget.keeps_everything(context):
            return blocks // full, blocks // full
        held = compressed_blocks(self.heads, B, self.kept(context), self.headroom)
        worst = full_blocks(self.heads, B, context) + held
        return blocks // full, 0 if worst > blocks else 1 + (blocks - worst) // held

    def prefill_peak(self, context: int) -> int:
        # A compressed run allocates exactly the prompt, then compacts; an uncompressed one allocates the
        # prompt and its headroom up front. (Compaction briefly holds one layer's new pools on top.)
        return max(self.heads * context * self.entry, self.held(context))


def pool_capacity(cfg: ModelConfig, context: int, budget, dtype_bytes: int, headroom_tokens: int,
                  pool_bytes: int) -> tuple[int, int]:
    """(uncompressed, compressed) sequences of `context` tokens the batched engine holds at once in a KV
    pool of pool_bytes (the same admission arithmetic as runtime/engine/scheduler.py)."""
    sizes = _SequenceBytes(cfg.num_layers * cfg.num_kv_heads, 2 * cfg.head_dim * dtype_bytes, budget, cfg,
                           headroom_tokens)
    return sizes.pool_batches(context, pool_bytes)


def _fits(sizes: _SequenceBytes, context: int, memory: int, weights: int) -> Fits:
    free = memory - weights
    if free <= 0:
        raise KvxError(f"memory {human_bytes(memory)} is smaller than the weights ({human_bytes(weights)})")
    held, peak = sizes.held(context), sizes.prefill_peak(context)
    pool_full, pool_budget = sizes.pool_batches(context, free)
    return Fits(
        memory=memory, free=free,
        max_context_full=_largest(sizes.full, free) or 0,
        max_context_budget=_largest(sizes.prefill_peak, free) or 0,
        max_context_held=_largest(sizes.held, free),
        max_batch_full=free // sizes.full(context),
        max_batch_budget=0 if peak > free else 1 + (free - peak) // held,
        max_batch_held=free // held,
        block_size=DEFAULT_BLOCK_SIZE, max_batch_pool_full=pool_full, max_batch_pool_budget=pool_budget,
    )


def _largest(nbytes: Callable[[int], int], free: int) -> int | None:
    """The largest context whose (non-decreasing) byte count fits in `free`; None if every context fits."""
    if nbytes(1) > free:
        return 0
    lo, hi = 1, 2
    while nbytes(hi) <= free:
        if hi >= 1 << 62:
            return None
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # nbytes(lo) fits, nbytes(hi) does not
        mid = (lo + hi) // 2
        if nbytes(mid) <= free:
            lo = mid
        else:
            hi = mid
    return lo


# -- will this request fit? (checked before a prefill, instead of an out-of-memory crash) -------------

@dataclass
class Need:
    """Memory one generation request allocates at its peak, from its sizes alone."""

    kv_bytes: int  # the KV cache at its largest (prefill, or after compaction with decode headroom)
    activation_bytes: int  # prefill activations (counted on a GPU only; 0 on the CPU)

    @property
    def total(self) -> int:
        return self.kv_bytes + self.activation_bytes


def prefill_activation_bytes(cfg: ModelConfig, tokens: int, dtype_bytes: int) -> int:
    """About the largest set of tensors alive while one layer runs over `tokens` tokens: the residual
    stream and its norm, q/k/v, the attention output and its float32 row statistics, and the MLP's
    gate, up and activated tensors. Attention never forms an n x n matrix, so nothing here is quadratic."""
    D, d, F = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    per_token = 4 * D + 2 * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + 3 * F
    return tokens * (per_token * dtype_bytes + 8 * cfg.num_heads) + 4 * cfg.vocab_size


def available_bytes(device) -> tuple[int | None, str]:
    """(bytes the device can still give, a phrase saying so with {} for the size). None: unknown.

    KVX_MEMORY_LIMIT (e.g. 8GiB) overrides the measurement: to leave room for other programs, or in tests.
    On a GPU: the driver's free memory plus what PyTorch's allocator has reserved but not handed out.
    On the CPU: MemAvailable from /proc/meminfo (else the free physical pages).
    """
    import os

    limit = os.environ.get("KVX_MEMORY_LIMIT")
    if limit:
        try:
            return parse_size(limit), "KVX_MEMORY_LIMIT allows {}"
        except KvxError as exc:
            raise KvxError(f"KVX_MEMORY_LIMIT: {exc}") from None
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached), f"{device} has {{}} free"
    return _cpu_available(), "the CPU has {} available"


def _cpu_available() -> int | None:
    """Bytes the OS can hand out without swapping (psutil: MemAvailable on Linux); None when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - a platform psutil cannot read: no check rather than a wrong one
        return None


def check_fits(need: Need, device, available: int | None = None, hint: Callable[[int], str] | None = None) -> None:
    """KvxError saying how much the request needs and how much there is, unless it fits.

    `available` overrides the measurement (tests); `hint(available)` ends the message with what would fit.
    """
    phrase = "{} are available"
    if available is None:
        available, phrase = available_bytes(device)
    if available is None or need.total <= available:
        return
    parts = f"its KV cache needs {human_bytes(need.kv_bytes)}"
    if need.activation_bytes:
        parts += f" and its activations {human_bytes(need.activation_bytes)}"
        parts += f" ({human_bytes(need.total)} in all)"
    advice = hint(available) if hint is not None else ""
    raise KvxError(f"not enough memory for this request: {parts}, but {phrase.format(human_bytes(available))}"
                   + (f"; {advice}" if advice else ""))

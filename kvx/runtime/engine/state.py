"""One sequence's state in the engine, and what a finished generation reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from kvx.kernels.stats import LayerStats


@dataclass
class Timings:
    prefill_s: float = 0.0
    stats_s: float = 0.0  # part of prefill spent computing policy statistics
    select_s: float = 0.0
    compact_s: float = 0.0
    decode_s: float = 0.0
    decode_evict_s: float = 0.0  # part of decode spent in decode-time eviction


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str  # "eos" | "length"
    timings: Timings
    kv_bytes_full: int  # K+V bytes a full cache of the same tokens occupies
    kv_bytes_held: int  # K+V bytes allocated at the end (kept entries + headroom)
    kv_bytes_peak: int  # most K+V bytes allocated at any point
    kv_entries_kept: int  # (layer, kv head, token) entries held at the end
    kv_entries_full: int
    policy: str = "full"
    budget: str | None = None
    lengths: list[list[int]] = field(default_factory=list)  # kept tokens per (layer, kv head) after compression
    cached_tokens: int = 0  # prompt tokens read from a stored context instead of prefilled
    weights: str | None = None  # what the linear weights ran as: "int8 weights" (models/cpu_weights.describe)

    @property
    def prefill_tokens_per_s(self) -> float:
        # Tokens read from a stored context were not prefilled: they do not count towards the rate.
        done = self.prompt_tokens - self.cached_tokens
        return done / self.timings.prefill_s if self.timings.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.timings.decode_s if self.timings.decode_s else 0.0

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "finish_reason": self.finish_reason,
            "policy": self.policy,
            "budget": self.budget,
            "timings": {k: round(v, 6) for k, v in asdict(self.timings).items()},
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "kv_bytes_full": self.kv_bytes_full,
            "kv_bytes_held": self.kv_bytes_held,
            "kv_bytes_peak": self.kv_bytes_peak,
            "kv_entries_kept": self.kv_entries_kept,
            "kv_entries_full": self.kv_entries_full,
            "cached_tokens": self.cached_tokens,
        }


@dataclass
class SequenceState:
    """What the model runner keeps of one sequence: its cache, the policy and budget it is compressed with,
    its statistics, its position. (A user's ask is a GenerationRequest; the engine's record of it, with its
    reservation and decode state, a Sequence, whose `req` this is.)"""

    cache: object  # kvx.runtime.cache.paged_cache.PagedKVCache
    policy: object | None = None  # kvx.policies.Policy
    budget: object | None = None  # kvx.policies.Budget
    position: int = 0  # next absolute position
    stats: list[LayerStats | None] = field(default_factory=list)
    # AhaKV: the last r queries per layer, [H, r, d] each: a list (prefill, eager decode), or one
    # [layers, H, r, d] tensor once a captured or batched step decodes (push_recent_queries); both read as
    # recent_q[layer].
    recent_q: list[Tensor | None] | Tensor = field(default_factory=list)
    head_budget: list[list[int]] | None = None  # decode-time target length per (layer, kv head)
    timings: Timings = field(default_factory=Timings)
    lengths_after_compress: list[list[int]] = field(default_factory=list)
    _head_budget_array: tuple | None = field(default=None, repr=False, compare=False)

    def head_budget_array(self) -> np.ndarray:
        """head_budget as an int64 [layers, kv heads] array, rebuilt only when head_budget is replaced."""
        memo = self._head_budget_array
        if memo is None or memo[0] is not self.head_budget:
            memo = self._head_budget_array = (self.head_budget, np.asarray(self.head_budget, dtype=np.int64))
        return memo[1]

    def push_recent_queries(self, q: Tensor) -> None:
        """AhaKV: append one decode step's queries q [layers, H, 1, d] to the last r of every layer, kept from
        then on as one [layers, H, r, d] tensor (two ops per step, not two per layer)."""
        prev = self.recent_q
        if not isinstance(prev, Tensor):
            prev = None if not prev or prev[0] is None else torch.stack(list(prev))
        rq = q if prev is None else torch.cat([prev, q], dim=2)
        self.recent_q = rq[:, :, -self.policy.window:].clone()

    @property
    def compresses(self) -> bool:
        return self.policy is not None and self.policy.name != "full" and self.budget is not None

    @property
    def decode_mode(self) -> str | None:
        return self.policy.decode_mode if self.compresses else None

    @property
    def evicts_while_decoding(self) -> bool:
        """Whether decoding keeps this request at a budget (a decode-time policy that did compress: at a
        budget that keeps everything, h2o's cache grows as a full one does and needs the full headroom)."""
        return self.decode_mode is not None and self.head_budget is not None

"""What every scorer shares: the scoring context, the decode-time view, and small tensor helpers.

A Scorer turns one layer's statistics into token importance per kv head ([Hkv, n], higher = keep). Only
the candidate region [lo, hi) — every token that is neither a sink nor in the protected window — is
ranked; protected tokens are kept by the policy regardless of their score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kvx.kernels.stats import LayerStats, StatsRequest


@dataclass(frozen=True)
class ScoreContext:
    layer: int
    num_layers: int
    num_kv_heads: int
    num_heads: int
    head_dim: int
    lo: int  # first candidate token (after the sinks)
    hi: int  # one past the last candidate token (before the protected window)
    per_head: float  # average kept entries per kv head under the budget

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


class DecodeView:
    """One (layer, kv head) cache segment during decoding, in position order.

    keys [n, d] (post-RoPE) and values [n, d] may be given, or gathered on first use by `load_kv`: most
    decode-time policies (H2O, TOVA, StreamingLLM) read only positions and mass, and gathering a paged
    segment's K/V for every head at every eviction would cost more than the choice itself.
    """

    def __init__(self, *, positions: Tensor, key_mass: Tensor, recent_queries: Tensor | None, query_position: int,
                 head_dim: int, scale: float, keys: Tensor | None = None, values: Tensor | None = None,
                 load_kv: Callable[[], tuple[Tensor, Tensor]] | None = None):
        if (keys is None or values is None) and load_kv is None:
            raise ValueError("DecodeView needs keys and values, or load_kv to gather them")
        self.positions = positions  # [n]
        self.key_mass = key_mass  # [n] float32: H2O accumulated mass / TOVA this step's mass, summed over the group
        self.recent_queries = recent_queries  # [G, r, d] post-RoPE, most recent last (AhaKV)
        self.query_position = query_position  # absolute position of the current query
        self.head_dim = head_dim
        self.scale = scale
        self._keys, self._values, self._load_kv = keys, values, load_kv

    @property
    def n(self) -> int:
        return self.positions.shape[0]

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def _load(self) -> None:
        self._keys, self._values = self._load_kv()
        self._load_kv = None

    @property
    def keys(self) -> Tensor:
        if self._keys is None:
            self._load()
        return self._keys

    @property
    def values(self) -> Tensor:
        if self._values is None:
            self._load()
        return self._values


class DecodeBatch:
    """Many segments during decoding at once (the batched engine's eviction round), one row each, padded
    to the longest: the batched twin of DecodeView, read by Scorer.decode_scores.

    valid [rows, L] marks each row's first n entries; positions [rows, L]; mass [rows, L] float32 (zeros
    where a cache tracks none); keys / values [rows, L, d] gathered on first use; recent_queries
    [rows, G, r, d] (the same r for every row) and query_position [rows, 1]; keep [rows, 1]."""

    def __init__(self, *, valid: Tensor, positions: Tensor, mass: Tensor, keep: Tensor, query_position: Tensor,
                 recent_queries: Tensor | None, head_dim: int, scale: float,
                 load_kv: Callable[[], tuple[Tensor, Tensor]]):
        self.valid, self.positions, self.mass, self.keep = valid, positions, mass, keep
        self.query_position, self.recent_queries = query_position, recent_queries
        self.head_dim, self.scale = head_dim, scale
        self._kv, self._load_kv = None, load_kv

    @property
    def n(self) -> Tensor:
        return self.valid.sum(dim=1, keepdim=True)

    @property
    def keys(self) -> Tensor:
        if self._kv is None:
            self._kv = self._load_kv()
        return self._kv[0]

    @property
    def values(self) -> Tensor:
        if self._kv is None:
            self._kv = self._load_kv()
        return self._kv[1]


class Scorer:
    """Token importance for one method. Subclasses are dataclasses whose fields are the method's options."""

    name: str = ""
    sinks: int = 0
    window: int = 0
    decode_mode: str | None = None
    # CriticalKV-style two-stage selection: the first `first_stage_ratio` of a head's count is chosen by
    # score(), the rest by stage_two(). 1.0 means a single stage.
    first_stage_ratio: float = 1.0

    def request(self) -> StatsRequest:
        return StatsRequest()

    def protected_window(self, per_head: float) -> int:
        """Recent tokens protected in every head (H2O derives it from the budget)."""
        return self.window

    def window_on_top(self) -> bool:
        """Whether the protected window is kept on top of the budget (the budget then counts the other
        n - window tokens: K = budget of (n - w) + w per head), rather than inside it (the default)."""
        return False

    def score(self, stats: LayerStats, ctx: ScoreContext) -> Tensor:
        raise NotImplementedError

    def stage_two(self, stats: LayerStats, ctx: ScoreContext, base: Tensor) -> Tensor | None:
        return None

    def decode_keep(self, view: DecodeView, keep_count: int) -> Tensor:
        raise NotImplementedError(f"{self.name} does not evict during decoding")

    def decode_rule(self, n: np.ndarray, keep_count: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """decode_keep() as a rule that the batched engine applies to many segments at once
        (runtime/compression/batch_eviction.py). n and keep_count: int arrays, one entry per segment with keep_count < n.
        Returns (sinks, recent) per segment: the first `sinks` entries, then the `recent` most recent ones,
        most recent first, are protected in that priority order, and the other entries are ranked by
        decode_scores() (the attention mass unless a scorer says otherwise), ties to the lower index.
        None: no such rule; decode_keep() then runs per segment."""
        return None

    def decode_scores(self, batch: DecodeBatch) -> Tensor:
        """[rows, L] the score that ranks the unprotected entries of decode_rule(), higher kept first:
        by default the decode-time attention mass (H2O's running sum, TOVA's last step)."""
        return batch.mass


def gqa_mean(x: Tensor, num_kv_heads: int) -> Tensor:
    """[H, n] per query head -> [Hkv, n], mean over each kv head's group of query heads."""
    H, n = x.shape
    return x.reshape(num_kv_heads, H // num_kv_heads, n).mean(dim=1)


def pool_keys(x: Tensor, kernel: int, kind: str, count_pad: bool = True) -> Tensor:
    """1-D max/avg pooling along the last axis, stride 1, padding kernel//2 (avg counts the padding unless
    count_pad is False), output as long as the input. Kernel <= 1 leaves x unchanged."""
    if kernel <= 1 or x.shape[-1] == 0:
        return x
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1]).float()
    pad = kernel // 2
    if kind == "max":
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=pad)
    else:
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=pad, count_include_pad=count_pad)
    return pooled[..., : shape[-1]].reshape(shape)


def pool_candidates(x: Tensor, ctx: ScoreContext, kernel: int, kind: str) -> Tensor:
    """Pool only the candidate region [lo, hi) of x [..., n], as the reference codes pool the
    non-window prefix; protected positions are left as they are (their score is never used)."""
    out = x.clone()
    out[..., ctx.lo:ctx.hi] = pool_keys(x[..., ctx.lo:ctx.hi], kernel, kind)
    return out


def top_indices(scores: Tensor, count: int) -> Tensor:
    """Indices of the `count` largest scores; ties go to the lower index (deterministic)."""
    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:count]


def keep_with_protected(scores: Tensor, protected: Tensor, keep_count: int) -> Tensor:
    """Sorted indices: the protected ones (in their priority order, truncated if keep_count is smaller)
    plus the top-scoring others up to keep_count."""
    n = scores.shape[0]
    if keep_count >= n:
        return torch.arange(n, device=scores.device)
    if keep_count <= protected.numel():
        return torch.sort(protected[:keep_count]).values
    masked = scores.float().clone()
    masked[protected] = float("-inf")
    extra = top_indices(masked, keep_count - protected.numel())
    return torch.sort(torch.cat([protected, extra])).values


def recent_indices(n: int, count: int, device) -> Tensor:
    """The `count` most recent positions of a segment, most recent first (their protection order)."""
    count = max(0, min(n, count))
    return torch.arange(n - 1, n - 1 - count, -1, device=device)

"""SnapKV (arXiv 2404.14469): attention of the last `window` prompt queries, pooled, kept per head.

a[h, j] = mean over the window rows of A[h, t, j]; pooled along the keys over the non-window prefix (per
query head), then averaged over the group; or (pool_order=group, Ada-KV's code) averaged over the group
first, then pooled. The window itself is protected.
Defaults follow the official LongBench configs: window 32, max-pool 7.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from kvx.kernels.stats import LayerStats, StatsRequest
from kvx.policies.base import ScoreContext, Scorer, gqa_mean, pool_candidates


def window_attention_scores(stats: LayerStats, ctx: ScoreContext, kernel: int, pooling: str,
                            pool_order: str = "head") -> Tensor:
    """[Hkv, n] SnapKV score: window-mean attention, pooled per query head then the group mean
    (pool_order=head), or the group mean then pooled (pool_order=group, Ada-KV's code)."""
    mean = stats.col_sum.float() / max(stats.window, 1)
    if pool_order == "group":
        return pool_candidates(gqa_mean(mean, ctx.num_kv_heads), ctx, kernel, pooling)
    return gqa_mean(pool_candidates(mean, ctx, kernel, pooling), ctx.num_kv_heads)


@dataclass
class SnapKVScorer(Scorer):
    name = "snapkv"
    window: int = field(default=32, metadata={"min": 1, "help": "observation window: last prompt queries, protected"})
    kernel: int = field(default=7, metadata={"min": 0, "help": "pooling kernel along the keys (0 or 1: none)"})
    pooling: str = field(default="max", metadata={"choices": ("max", "avg"), "help": "pooling kind"})
    sinks: int = field(default=0, metadata={"min": 0, "help": "first tokens always kept"})
    pool_order: str = field(default="head", metadata={
        "choices": ("head", "group"),
        "help": "pool each query head then take the group mean (head), or the group mean then pool (group, "
                "Ada-KV's code; the default of ada-snapkv and ada-pyramidkv)"})

    def request(self) -> StatsRequest:
        return StatsRequest(window=self.window)

    def score(self, stats: LayerStats, ctx: ScoreContext) -> Tensor:
        return window_attention_scores(stats, ctx, self.kernel, self.pooling, self.pool_order)

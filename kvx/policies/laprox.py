"""LaProx (arXiv 2605.07234): eviction as approximating the layer's output product, selected model-wide.

The layer output over the window queries is a sum over (head, token) terms a_{h,j} u_{h,j}^T with
a_{h,j} = A_h[W, j] and u_{h,j} = v_j W_O^h; the deterministic column-row sampling score of a term is
||a_{h,j}||_2·||u_{h,j}||_2 = sqrt(col_sq)·||v W_O^h||_2. Per query head, then group mean, then avg-pool 7
over the candidates; the window is protected; the global allocator normalises each layer's scores to sum
to 1 and keeps one top-K over the whole model. Form and defaults from a re-implementation of the paper
(see POLICIES.md 2): no public code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from kvx.kernels.stats import LayerStats, StatsRequest
from kvx.policies.base import ScoreContext, Scorer, gqa_mean, pool_candidates


@dataclass
class LaProxScorer(Scorer):
    name = "laprox"
    window: int = field(default=32, metadata={"min": 1, "help": "observation window: last prompt queries, protected"})
    kernel: int = field(default=7, metadata={"min": 0, "help": "pooling kernel along the keys (0 or 1: none)"})
    pooling: str = field(default="avg", metadata={"choices": ("max", "avg"), "help": "pooling kind"})
    sinks: int = field(default=0, metadata={"min": 0, "help": "first tokens always kept"})
    # "5% of the KV cache" (the paper's wording) counts every entry the cache holds, the window included:
    # inside. A re-implementation from the paper keeps the window on top, K = rho L Hkv (n - w): outside.
    window_budget: str = field(default="inside", metadata={
        "choices": ("inside", "outside"),
        "help": "the protected window counts inside the budget, or is kept on top of it (K = rho L Hkv (n-w))"})

    def window_on_top(self) -> bool:
        return self.window_budget == "outside"

    def request(self) -> StatsRequest:
        return StatsRequest(window=self.window, window_sq=True, value_out_norm=True)

    def score(self, stats: LayerStats, ctx: ScoreContext) -> Tensor:
        terms = stats.col_sq.float().clamp(min=0).sqrt() * stats.value_out_norm.float()
        return pool_candidates(gqa_mean(terms, ctx.num_kv_heads), ctx, self.kernel, self.pooling)

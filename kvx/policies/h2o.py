"""H2O (arXiv 2306.14048): heavy hitters by accumulated attention plus the most recent tokens.

Prefill (KVCache-Factory's variant): the score is the attention mass a key received from every prompt
query, optionally divided by the number of queries that could see it (kvpress's ObservedAttention; off as
in H2O), mean over the group. `recent` tokens are protected — by default half of the budget, H2O's equal
heavy/recent split. Decoding accumulates each step's mass and evicts the lowest-mass non-recent tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from kvx.kernels.stats import LayerStats, StatsRequest
from kvx.policies.base import DecodeView, ScoreContext, Scorer, gqa_mean, keep_with_protected, recent_indices


@dataclass
class H2OScorer(Scorer):
    name = "h2o"
    decode_mode = "accumulate"
    recent: int | None = field(default=None, metadata={"min": 0, "help": "recent tokens protected; auto = half the budget"})
    normalize: bool = field(default=False, metadata={"help": "divide by the number of queries that saw each key"})
    sinks: int = field(default=0, metadata={"min": 0, "help": "first tokens always kept"})

    def request(self) -> StatsRequest:
        return StatsRequest(colsum_all=True)

    def _recent(self, per_head: float) -> int:
        return self.recent if self.recent is not None else int(per_head // 2)

    def protected_window(self, per_head: float) -> int:
        return self._recent(per_head)

    def score(self, stats: LayerStats, ctx: ScoreContext) -> Tensor:
        mass = stats.colsum_all.float()
        if self.normalize:
            mass = mass / stats.colsum_count.float().clamp(min=1)
        return gqa_mean(mass, ctx.num_kv_heads)

    def decode_keep(self, view: DecodeView, keep_count: int) -> Tensor:
        n, device = view.n, view.device
        sinks = min(self.sinks, n)
        recent = recent_indices(n - sinks, self._recent(keep_count), device) + sinks
        protected = torch.cat([torch.arange(sinks, device=device), recent])
        return keep_with_protected(view.key_mass, protected, keep_count)

    def decode_rule(self, n: np.ndarray, keep_count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sinks = np.minimum(self.sinks, n)
        recent = self.recent if self.recent is not None else keep_count // 2  # _recent(), per segment
        return sinks, np.maximum(0, np.minimum(recent, n - sinks))

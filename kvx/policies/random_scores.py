"""Random eviction: a control that every real policy should beat. Seeded, so runs repeat."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvx.kernels.stats import LayerStats
from kvx.policies.base import ScoreContext, Scorer


@dataclass
class RandomScorer(Scorer):
    name = "random"
    seed: int = field(default=0, metadata={"min": 0, "help": "random seed"})
    sinks: int = field(default=0, metadata={"min": 0, "help": "first tokens always kept"})
    window: int = field(default=0, metadata={"min": 0, "help": "most recent tokens protected"})

    def score(self, stats: LayerStats, ctx: ScoreContext) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + ctx.layer)
        scores = torch.rand(ctx.num_kv_heads, stats.n, generator=gen)
        return scores.to(stats.positions.device)

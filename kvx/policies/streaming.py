"""StreamingLLM (arXiv 2309.17453): keep the first `sinks` tokens and the most recent ones.

No statistics. The score is the position itself, so a head's top candidates are the most recent tokens;
at decode time the same rule keeps the segment at its budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from kvx.kernels.stats import LayerStats
from kvx.policies.base import DecodeView, ScoreContext, Scorer, recent_indices


@dataclass
class StreamingScorer(Scorer):
    name = "streaming"
    decode_mode = "position"
    sinks: int = field(default=4, metadata={"min": 0, "help": "first tokens (attention sinks) always kept"})

    def score(self, stats: LayerStats, ctx: ScoreContext) -> Tensor:
        order = torch.arange(stats.n, device=stats.positions.device, dtype=torch.float32)
        return order.expand(ctx.num_kv_heads, stats.n)

    def decode_keep(self, view: DecodeView, keep_count: int) -> Tensor:
        n, device = view.n, view.device
        sinks = min(self.sinks, keep_count, n)
        recent = torch.sort(recent_indices(n - sinks, keep_count - sinks, device)).values + sinks
        return torch.cat([torch.arange(sinks, device=device), recent])

    def decode_rule(self, n: np.ndarray, keep_count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sinks = np.minimum(self.sinks, n)
        return sinks, n - sinks  # every entry protected: the sinks, then the most recent first

"""TOVA (arXiv 2401.06104): keep the tokens the current query attends to most.

Prefill (kvpress's variant): the last prompt query's attention, mean over the group, that query's own
token protected. Decoding: each step's attention mass (summed over the group) ranks the segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from kvx.kernels.stats import LayerStats, StatsRequest
from kvx.policies.base import DecodeView, ScoreContext, Scorer, gqa_mean, keep_with_protected, recent_indices


@dataclass
class TOVAScorer(Scorer):
    name = "tova"
    decode_mode = "last"
    window: int = field(default=1, metadata={"min": 0, "help": "most recent tokens protected"})
    sinks: int = field(default=0, metadata={"min": 0, "help": "first tokens always kept"})

    def request(self) -> StatsRequest:
        return StatsRequest(last_row=True)

    def score(self, stats: LayerStats, ctx: ScoreContext) -> Tensor:
        # The paper (and kvpress) rank by the mean over every head of the layer: that is the policy-wide
        # option heads=layer (policy.SelectionOptions); by default each kv head ranks by its own group.
        return gqa_mean(stats.last_row.float(), ctx.num_kv_heads)

    def decode_keep(self, view: DecodeView, keep_count: int) -> Tensor:
        n, device = view.n, view.device
        sinks = min(self.sinks, n)
        protected = torch.cat([torch.arange(sinks, device=device),
                               recent_indices(n - sinks, self.window, device) + sinks])
        return keep_with_protected(view.key_mass, protected, keep_count)

    def decode_rule(self, n: np.ndarray, keep_count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sinks = np.minimum(self.sinks, n)
        return sinks, np.clip(n - sinks, 0, self.window)

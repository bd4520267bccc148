"""CriticalKV (arXiv 2502.03805): attention mass weighted by the projected value's L1 norm.

The output error bound of evicting key j grows with A_j·||v_j W_O^h||_1 once the kept mass exceeds one
half, so a head's count is filled in two stages: the first `ratio` of it (protected tokens included) by
the SnapKV score, which secures that mass, then the rest by (score + eps)·mean_{h∈g} ||v W_O^h||_1 (the
order kvpress uses: group-mean score times group-mean norm). Allocation sees the SnapKV score, as
CriticalAdaKV allocates on the base score.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from kvx.kernels.stats import LayerStats, StatsRequest
from kvx.policies.base import ScoreContext, gqa_mean
from kvx.policies.snapkv import SnapKVScorer


@dataclass
class CriticalKVScorer(SnapKVScorer):
    name = "criticalkv"
    ratio: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0,
                                                "help": "share of each head's count chosen by attention alone"})
    eps: float = field(default=1e-4, metadata={"min": 0.0, "help": "added to the score before weighting"})

    @property
    def first_stage_ratio(self) -> float:
        return self.ratio

    def request(self) -> StatsRequest:
        return StatsRequest(window=self.window, value_out_l1=True)

    def stage_two(self, stats: LayerStats, ctx: ScoreContext, base: Tensor) -> Tensor:
        return (base + self.eps) * gqa_mean(stats.value_out_l1.float(), ctx.num_kv_heads)

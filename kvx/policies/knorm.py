"""KNorm (arXiv 2406.11430): keep the keys with the lowest L2 norm.

RoPE is a rotation, so pre- and post-RoPE norms agree. Needs no attention statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from kvx.kernels.stats import LayerStats, StatsRequest
from kvx.policies.base import ScoreContext, Scorer


@dataclass
class KNormScorer(Scorer):
    name = "knorm"
    sinks: int = field(default=0, metadata={"min": 0, "help": "first tokens always kept"})
    window: int = field(default=0, metadata={"min": 0, "help": "most recent tokens protected"})

    def request(self) -> StatsRequest:
        return StatsRequest(key_norm=True)

    def score(self, stats: LayerStats, ctx: ScoreContext) -> Tensor:
        return -stats.key_norm.float()

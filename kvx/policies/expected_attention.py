"""ExpectedAttention (arXiv 2510.00636): the attention future queries are expected to pay each key.

Future queries are modelled as Gaussian with the prompt's pre-RoPE query mean μ and covariance Σ (sinks
excluded), rotated by the average RoPE rotation R̄ over the next `horizon` positions: μ̄ = R̄μ,
Σ̄ = R̄ΣR̄ᵀ. Then E[exp(q·k/√d)] = exp(μ̄·k/√d + kᵀΣ̄k/(2d)), softmax over the keys, mean over the group,
plus eps, times ||v||. The first `sinks` tokens are protected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from kvx.kernels.stats import LayerStats, StatsRequest
from kvx.policies.base import ScoreContext, Scorer, gqa_mean


def mean_rotation(inv_freq: Tensor, first: int, count: int) -> tuple[Tensor, Tensor]:
    """Mean cos and sin [d] of the rotate-half RoPE over positions first .. first+count-1."""
    positions = torch.arange(first, first + count, dtype=torch.float64)
    angles = positions[:, None] * inv_freq.double().cpu()[None, :]
    cos, sin = angles.cos().mean(0), angles.sin().mean(0)
    return torch.cat([cos, cos]).float(), torch.cat([sin, sin]).float()


def rotate_rows(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x R̄ᵀ for row vectors x [..., d]: the (averaged) rotate-half rotation of each row."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def expected_logits(keys: Tensor, q_mean: Tensor, q_cov: Tensor | None, cos: Tensor, sin: Tensor) -> Tensor:
    """z [H, n] = μ̄_h·k/√d + kᵀΣ̄_h k/(2d) for keys [Hkv, n, d] (post-RoPE), one kv head per group."""
    H, d = q_mean.shape
    hkv = keys.shape[0]
    group = H // hkv
    cos, sin = cos.to(keys.device), sin.to(keys.device)
    mu_bar = rotate_rows(q_mean.float(), cos, sin)
    cov_bar = None
    if q_cov is not None:
        cov_bar = rotate_rows(rotate_rows(q_cov.float(), cos, sin).transpose(-1, -2), cos, sin)
    out = torch.empty(H, keys.shape[1], device=keys.device)
    for h in range(H):
        k = keys[h // group].float()
        z = k @ mu_bar[h] / math.sqrt(d)
        if cov_bar is not None:
            z = z + ((k @ cov_bar[h]) * k).sum(-1) / (2 * d)
        out[h] = z
    return out


@dataclass
class ExpectedAttentionScorer(Scorer):
    name = "expected-attention"
    sinks: int = field(default=4, metadata={"min": 0, "help": "first tokens always kept"})
    window: int = field(default=0, metadata={"min": 0, "help": "most recent tokens protected"})
    horizon: int = field(default=512, metadata={"min": 1, "help": "future positions the RoPE rotation is averaged over"})
    eps: float = field(default=0.0, metadata={"min": 0.0, "help": "added to the expected attention before the ||v|| weight"})
    covariance: bool = field(default=True, metadata={"help": "use the query covariance term"})
    vnorm: bool = field(default=True, metadata={"help": "weight by ||v||"})
    rope_theta: float = field(default=10000.0, metadata={"min": 1e-6, "help": "RoPE base when the model gives no frequencies"})

    def __post_init__(self) -> None:
        self._inv_freq: Tensor | None = None
        self._theta_is_explicit = False

    def set_model_info(self, inv_freq: Tensor | None = None, rope_theta: float | None = None, **_) -> None:
        """The model's RoPE frequencies win over rope_theta unless the user set rope_theta explicitly."""
        if self._theta_is_explicit:
            return
        if inv_freq is not None:
            self._inv_freq = inv_freq.detach().float().cpu()
        if rope_theta is not None:
            self.rope_theta = float(rope_theta)

    def mark_explicit(self, names: set[str]) -> None:
        self._theta_is_explicit = "rope_theta" in names

    def inv_freq(self, head_dim: int) -> Tensor:
        if self._inv_freq is not None and self._inv_freq.numel() == head_dim // 2:
            return self._inv_freq
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        return 1.0 / (self.rope_theta ** exponents)

    def request(self) -> StatsRequest:
        wanted = dict(query_moments=True, value_norm=self.vnorm)
        if any(f.name == "keys" for f in fields(StatsRequest)):
            wanted["keys"] = True
        return StatsRequest(**wanted)

    def score(self, stats: LayerStats, ctx: ScoreContext) -> Tensor:
        keys = getattr(stats, "keys", None)
        if keys is None:
            raise RuntimeError("expected-attention needs the layer's post-RoPE keys in LayerStats.keys [Hkv, n, d]")
        cos, sin = mean_rotation(self.inv_freq(ctx.head_dim), stats.query_position + 1, self.horizon)
        z = expected_logits(keys, stats.q_mean, stats.q_cov if self.covariance else None, cos, sin)
        scores = gqa_mean(torch.softmax(z, dim=-1), ctx.num_kv_heads) + self.eps
        if self.vnorm:
            scores = scores * stats.value_norm.float()
        return scores

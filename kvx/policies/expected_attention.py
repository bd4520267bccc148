"""ExpectedAttention (arXiv 2510.00636): the attention future queries are expected to pay each key.

Future queries are modelled as Gaussian with the prompt's pre-RoPE query mean μ and covariance Σ (sinks
excluded), rotated by the average RoPE rotation R̄ over the next `horizon` positions: μ̄ = R̄μ,
Σ̄ = R̄ΣR̄ᵀ. Then E[exp(q·k/√d)] = exp(μ̄·k/√d + kᵀΣ̄k/(2d)), softmax over the keys, mean over the group,
plus eps, times ||v||. The first `sinks` tokens are protected.

Cost: the averaged rotation is the same for every layer of a request, so it is built once and reused;
the logits of all heads come from a few batched products (see expected_logits), with no per-head loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from kvx.kernels.stats import LayerStats, StatsRequest
from kvx.policies.base import ScoreContext, Scorer, gqa_mean

# Elements (query heads x keys x (head dim + 1)) of one intermediate of the logit product.
LOGIT_TILE_ELEMENTS = 1 << 24


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


def rotation_matrix(cos: Tensor, sin: Tensor) -> Tensor:
    """R̄ᵀ [d, d] as a matrix, so that x R̄ᵀ = x @ rotation_matrix(cos, sin)."""
    return rotate_rows(torch.eye(cos.shape[0], dtype=cos.dtype, device=cos.device), cos, sin)


def expected_logits(keys: Tensor, q_mean: Tensor, q_cov: Tensor | None, cos: Tensor, sin: Tensor,
                    rotation: Tensor | None = None) -> Tensor:
    """z [H, n] = μ̄_h·k/√d + kᵀΣ̄_h k/(2d) for keys [Hkv, n, d] (post-RoPE), one kv head per group.

    `rotation` is R̄ᵀ from rotation_matrix(cos, sin), when the caller has it already.

    The rotation moves onto the keys: with the row k̂ = k R̄/√(2d), kᵀΣ̄k/(2d) = k̂ Σ k̂ᵀ and
    μ̄·k/√d = k̂·(√2 μ). So one product of k̂ with [Σ_h | √2 μ_h] for all G heads of a group gives both
    terms, and the quadratic one is (k̂ Σ_h) ⊙ k̂ summed over d. Keys are tiled so that the
    [Hkv, tile, G(d+1)] intermediate stays bounded at any context length.
    """
    H, d = q_mean.shape
    hkv, n, _ = keys.shape
    group = H // hkv
    device = keys.device
    rt = (rotation if rotation is not None else rotation_matrix(cos.float(), sin.float())).to(device)
    mean = q_mean.float().to(device)
    if q_cov is None:
        mu_bar = (mean @ rt) / math.sqrt(d)  # rows μ̄ᵀ/√d [H, d]
        z = torch.bmm(keys.float(), mu_bar.view(hkv, group, d).transpose(1, 2))  # [Hkv, n, G]
        return z.permute(0, 2, 1).reshape(H, n)
    key_map = rt.T / math.sqrt(2 * d)  # k̂ = k @ key_map
    # [Hkv, d, G, d+1]: per query head of the group, Σ_h and then √2 μ_h as one more column.
    moments = torch.cat([q_cov.float().to(device).view(hkv, group, d, d).permute(0, 2, 1, 3),
                         (mean * math.sqrt(2.0)).view(hkv, group, d, 1).permute(0, 2, 1, 3)], dim=-1)
    moments = moments.reshape(hkv, d, group * (d + 1))
    z = torch.empty(hkv, n, group, dtype=torch.float32, device=device)
    tile = max(1, LOGIT_TILE_ELEMENTS // (H * (d + 1)))
    for s0 in range(0, n, tile):
        k_hat = torch.matmul(keys[:, s0:s0 + tile].float(), key_map)  # [Hkv, t, d]
        projected = torch.bmm(k_hat, moments).view(hkv, k_hat.shape[1], group, d + 1)
        z[:, s0:s0 + k_hat.shape[1]] = (torch.einsum("hngi,hni->hng", projected[..., :d], k_hat)
                                        + projected[..., d])
    return z.permute(0, 2, 1).reshape(H, n)


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
        self._rotation_key: tuple | None = None
        self._rotation: tuple[Tensor, Tensor, Tensor] | None = None

    def set_model_info(self, inv_freq: Tensor | None = None, rope_theta: float | None = None, **_) -> None:
        """The model's RoPE frequencies win over rope_theta unless the user set rope_theta explicitly."""
        if self._theta_is_explicit:
            return
        if inv_freq is not None:
            self._inv_freq = inv_freq.detach().float().cpu()
        if rope_theta is not None:
            self.rope_theta = float(rope_theta)
        self._rotation_key = self._rotation = None

    def mark_explicit(self, names: set[str]) -> None:
        self._theta_is_explicit = "rope_theta" in names

    def inv_freq(self, head_dim: int) -> Tensor:
        if self._inv_freq is not None and self._inv_freq.numel() == head_dim // 2:
            return self._inv_freq
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        return 1.0 / (self.rope_theta ** exponents)

    def averaged_rotation(self, head_dim: int, first: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """(cos, sin, R̄ᵀ) averaged over positions first .. first+horizon-1, on `device`.

        Every layer of a request asks for the same one, so the last answer is kept.
        """
        inv_freq = self.inv_freq(head_dim)
        key = (first, self.horizon, str(device), tuple(inv_freq.tolist()))
        if self._rotation_key != key:
            cos, sin = mean_rotation(inv_freq, first, self.horizon)
            self._rotation = (cos.to(device), sin.to(device), rotation_matrix(cos, sin).to(device))
            self._rotation_key = key
        return self._rotation

    def request(self) -> StatsRequest:
        wanted = dict(query_moments=True, value_norm=self.vnorm)
        if any(f.name == "keys" for f in fields(StatsRequest)):
            wanted["keys"] = True
        return StatsRequest(**wanted)

    def score(self, stats: LayerStats, ctx: ScoreContext) -> Tensor:
        keys = getattr(stats, "keys", None)
        if keys is None:
            raise RuntimeError("expected-attention needs the layer's post-RoPE keys in LayerStats.keys [Hkv, n, d]")
        cos, sin, rotation = self.averaged_rotation(ctx.head_dim, stats.query_position + 1, keys.device)
        z = expected_logits(keys, stats.q_mean, stats.q_cov if self.covariance else None, cos, sin, rotation)
        scores = gqa_mean(torch.softmax(z, dim=-1), ctx.num_kv_heads) + self.eps
        if self.vnorm:
            scores = scores * stats.value_norm.float()
        return scores

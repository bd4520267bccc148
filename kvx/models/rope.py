"""Rotary position embedding in the rotate-half convention that HF checkpoints are trained with.

Inverse frequencies follow the same float32 arithmetic as transformers so that cos/sin, and hence
logits, match bit for bit on float32 weights. Supported scalings: none, "linear", "llama3".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvx.errors import KvxError


def default_inv_freq(head_dim: int, theta: float) -> Tensor:
    """theta^(-2i/d) for i in [0, d/2), float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (theta**exponents)


def _llama3_scale(inv_freq: Tensor, scaling: dict) -> Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly.
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


def inv_freq_for(head_dim: int, theta: float, scaling: dict | None) -> Tensor:
    """Inverse frequencies [head_dim // 2] float32 for a config's RoPE (theta + optional scaling)."""
    inv_freq = default_inv_freq(head_dim, theta)
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_scale(inv_freq, scaling)
    raise KvxError(f"unsupported RoPE scaling {kind!r}; kvx supports linear and llama3")


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [T, d] computed in float32 and cast to dtype (as HF does)."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(device=positions.device, dtype=torch.float32)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_tables(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sign-folded sin [T, d] for `rotate`: the first half of sin negated.

    rotate_half(x) * sin == roll(x, d/2) * [-sin1, sin2] exactly (negation is exact), and a roll is one
    kernel where rotate_half is four, which matters at decode time.
    """
    cos, sin = rope_cos_sin(positions, inv_freq, dtype)
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, given rope_tables' output broadcastable against x."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def apply_rope(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotate x [heads, T, d] to the given positions [T]."""
    cos, signed_sin = rope_tables(positions, inv_freq, x.dtype)
    return rotate(x, cos, signed_sin)

"""Model-wide allocation (LaProx's Alg. 2, KVzip): one top-K over all layers and heads.

Each layer's candidate scores are normalised to sum to 1 over all its heads, so that layers with large
raw scores do not take the whole budget; then the K best (layer, head, token) candidates survive, where K
is the total minus every head's floor (its protected tokens, at least one). Layers and heads may end up
with very different counts: that is the point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvx.policies.allocation import Allocator, LayerCandidates, floors_fit, uniform_counts
from kvx.policies.base import top_indices


def normalise_layer(scores: Tensor) -> Tensor:
    """Scores shifted to be non-negative (only when some are negative) and scaled to sum to 1."""
    s = scores.float()
    finite = torch.isfinite(s)
    s = torch.where(finite, s, torch.zeros_like(s))
    if s.numel() and float(s.min()) < 0:
        s = s - s.min()
    total = s.sum()
    if float(total) <= 0:
        s = torch.ones_like(s)
        total = s.sum()
    s = s / total
    return torch.where(finite, s, torch.full_like(s, float("-inf")))


@dataclass
class GlobalAllocator(Allocator):
    name = "global"
    head_adaptive = True
    # KVzip's scores are attention probabilities, comparable across layers as they are: its authors (and
    # kvpress) rank the raw scores, so kvzip runs with normalize=false.
    normalize: bool = field(default=True, metadata={
        "help": "scale each layer's candidate scores to sum to 1 before the model-wide top-K"})

    def allocate(self, layers: list[LayerCandidates], total: int) -> list[list[int]]:
        if not floors_fit(layers, total):
            return uniform_counts(layers, total)
        pools, owners, floors = [], [], []
        for layer in layers:
            s = normalise_layer(layer.scores) if self.normalize else layer.scores.float()
            hkv, m = s.shape
            if layer.floor > layer.protected and m > 0:
                # Nothing protected: the head's floor of one entry is its own best candidate.
                s = s.scatter(1, torch.argmax(s, dim=1, keepdim=True), float("-inf"))
            pools.append(s.reshape(-1))
            owners.append(torch.arange(len(floors), len(floors) + hkv).repeat_interleave(m))
            floors.extend([layer.floor] * hkv)
        extra = total - sum(floors)
        flat = torch.cat([p.to(pools[0].device) for p in pools])
        winners = top_indices(flat, extra).cpu()
        wins = torch.bincount(torch.cat(owners)[winners], minlength=len(floors)).tolist()
        counts = [f + w for f, w in zip(floors, wins)]
        out, i = [], 0
        for layer in layers:
            out.append(counts[i:i + layer.num_kv_heads])
            i += layer.num_kv_heads
        return out

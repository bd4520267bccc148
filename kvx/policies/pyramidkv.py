"""PyramidKV (arXiv 2406.02069): per-layer budgets decreasing linearly with depth.

With the average non-protected budget per head b̄ = k̄ − w: b_min = b̄/β, b_max = 2b̄ − b_min; when b_max
exceeds the candidates n − w, b_max = n − w and b_min = 2b̄ − b_max; layer l keeps
b_l = b_max − l·(b_max − b_min)/(L − 1) plus its protected tokens per head. The mean over layers is b̄,
so the model-wide total is the budget; within a layer every head keeps the same count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvx.policies.allocation import (
    Allocator,
    LayerCandidates,
    floors_fit,
    round_to_total,
    uniform_counts,
    uniform_layer_totals,
    within_layer_uniform,
)


def pyramid_schedule(per_head: float, protected: float, candidates: float, num_layers: int,
                     beta: float) -> list[float] | None:
    """Non-protected tokens per head for each layer (bottom first), or None when the schedule does not
    apply (a single layer, or a budget no larger than the protected tokens)."""
    mean_free = per_head - protected
    if num_layers < 2 or mean_free <= 0:
        return None
    b_min = mean_free / beta
    b_max = 2 * mean_free - b_min
    if b_max >= candidates:
        b_max = candidates
        b_min = 2 * mean_free - b_max
    step = (b_max - b_min) / (num_layers - 1)
    return [b_max - layer * step for layer in range(num_layers)]


def pyramid_layer_totals(layers: list[LayerCandidates], total: int, beta: float) -> list[int]:
    """Exact per-layer totals following the pyramid schedule (uniform where it does not apply)."""
    L = len(layers)
    hkv = layers[0].num_kv_heads
    per_head = total / sum(layer.num_kv_heads for layer in layers)
    protected = sum(layer.protected for layer in layers) / L
    candidates = min(layer.n for layer in layers) - protected
    schedule = pyramid_schedule(per_head, protected, candidates, L, beta)
    if schedule is None or not floors_fit(layers, total):
        return uniform_layer_totals(layers, total)
    targets = torch.tensor([hkv * (b + layer.protected) for b, layer in zip(schedule, layers)])
    lo = torch.tensor([layer.floor * layer.num_kv_heads for layer in layers])
    hi = torch.tensor([layer.n * layer.num_kv_heads for layer in layers])
    return round_to_total(targets, lo, hi, total)


@dataclass
class PyramidAllocator(Allocator):
    name = "pyramid"
    beta: float = field(default=20.0, metadata={"min": 1.0, "help": "the last layer keeps 1/beta of the average non-protected budget"})

    def allocate(self, layers: list[LayerCandidates], total: int) -> list[list[int]]:
        if not floors_fit(layers, total):
            return uniform_counts(layers, total)
        return within_layer_uniform(pyramid_layer_totals(layers, total, self.beta), layers)

"""How many entries each (layer, kv head) keeps: the shared pieces and the uniform allocator.

An allocator sees, per layer, the candidate scores of every kv head and how many tokens are protected,
and returns per layer, per kv head, a count (protected tokens included). The counts always sum exactly to
the model-wide total it is given, and no head keeps more tokens than exist. Every head keeps at least
its `floor` (its protected tokens, at least one) whenever the total allows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LayerCandidates:
    scores: Tensor  # [Hkv, m] scores of the candidate (non-protected) tokens
    protected: int  # tokens protected in every head of the layer
    n: int  # tokens per head

    @property
    def num_kv_heads(self) -> int:
        return self.scores.shape[0]

    @property
    def floor(self) -> int:
        return min(self.n, max(self.protected, 1))


class Allocator:
    name: str = ""
    # Whether the heads of a layer may get different counts by their scores (Ada-KV, a model-wide top-K).
    # If not, every head of a layer keeps within one entry of the others, so a tensor-parallel rank's share
    # of a compression is its heads' share of the budget (runtime/engine/scheduler.kept_on_rank).
    head_adaptive: bool = False

    def allocate(self, layers: list[LayerCandidates], total: int) -> list[list[int]]:
        raise NotImplementedError


def spread_evenly(total: int, caps: list[int]) -> list[int]:
    """Split total as evenly as possible under per-slot caps; leftovers go to the lowest slots first."""
    if total >= sum(caps):
        return list(caps)
    # The largest level x with sum(min(cap, x)) <= total, found by bisection.
    lo, hi = 0, max(caps)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(c, mid) for c in caps) <= total:
            lo = mid
        else:
            hi = mid - 1
    out = [min(c, lo) for c in caps]
    left = total - sum(out)
    for i, c in enumerate(caps):
        if left == 0:
            break
        if c > out[i]:
            out[i] += 1
            left -= 1
    return out


def round_to_total(targets: Tensor, lo: Tensor, hi: Tensor, total: int) -> list[int]:
    """Integer counts near real targets with lo <= count <= hi and sum == total exactly.

    Starts from floor(targets) and moves one unit at a time where the rounding error is largest (the
    largest-remainder method); ties go to the lower slot. Needs sum(lo) <= total <= sum(hi).
    """
    t = targets.double().cpu()
    lo_t, hi_t = lo.long().cpu(), hi.long().cpu()
    if not int(lo_t.sum()) <= total <= int(hi_t.sum()):
        raise ValueError(f"cannot split {total} within bounds summing to {int(lo_t.sum())}..{int(hi_t.sum())}")
    counts = torch.minimum(torch.maximum(torch.floor(t).long(), lo_t), hi_t)
    diff = total - int(counts.sum())
    while diff != 0:
        error = t - counts.double()
        if diff > 0:
            key = torch.where(counts < hi_t, error, torch.full_like(error, float("-inf")))
        else:
            key = torch.where(counts > lo_t, -error, torch.full_like(error, float("-inf")))
        movable = int(torch.isfinite(key).sum())
        order = torch.sort(key, descending=True, stable=True).indices[: min(abs(diff), movable)]
        counts[order] += 1 if diff > 0 else -1
        diff = total - int(counts.sum())
    return counts.tolist()


def uniform_counts(layers: list[LayerCandidates], total: int) -> list[list[int]]:
    """Every (layer, head) the same count; the remainder goes to the first heads."""
    caps = [layer.n for layer in layers for _ in range(layer.num_kv_heads)]
    flat = spread_evenly(total, caps)
    return _unflatten(flat, layers)


def _unflatten(flat: list[int], layers: list[LayerCandidates]) -> list[list[int]]:
    out, i = [], 0
    for layer in layers:
        out.append(flat[i:i + layer.num_kv_heads])
        i += layer.num_kv_heads
    return out


def within_layer_uniform(layer_totals: list[int], layers: list[LayerCandidates]) -> list[list[int]]:
    return [spread_evenly(t, [layer.n] * layer.num_kv_heads) for t, layer in zip(layer_totals, layers)]


def uniform_layer_totals(layers: list[LayerCandidates], total: int) -> list[int]:
    """Per-layer totals that give every head the same average (remainder to the first layers)."""
    per_head = uniform_counts(layers, total)
    return [sum(c) for c in per_head]


def floors_fit(layers: list[LayerCandidates], total: int) -> bool:
    return sum(layer.floor * layer.num_kv_heads for layer in layers) <= total


@dataclass
class UniformAllocator(Allocator):
    name = "uniform"

    def allocate(self, layers: list[LayerCandidates], total: int) -> list[list[int]]:
        return uniform_counts(layers, total)

"""Ada-KV (arXiv 2407.11550): head-wise budgets from one top-B over all heads of a layer.

Within a layer with total T and protected p per head, the E = T − Hkv·p non-protected slots go to the
joint top-E candidate scores over all heads; f_g counts the winners in head g. The safeguard of the
authors' code mixes in a uniform floor: B_g = p + (1 − α)·f_g + α·E/Hkv, rounded so that the layer total
stays exactly T. Layer totals are uniform (Ada-SnapKV) or follow PyramidKV's schedule (Ada-PyramidKV).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvx.policies.allocation import (
    Allocator,
    LayerCandidates,
    floors_fit,
    round_to_total,
    spread_evenly,
    uniform_counts,
    uniform_layer_totals,
)
from kvx.policies.base import top_indices
from kvx.policies.pyramidkv import pyramid_layer_totals


def ada_head_counts(layer: LayerCandidates, layer_total: int, alpha: float) -> list[int]:
    hkv, m = layer.scores.shape
    extra = layer_total - hkv * layer.protected
    if extra <= 0 or m == 0 or hkv * layer.floor > layer_total:
        return spread_evenly(layer_total, [layer.n] * hkv)
    winners = top_indices(layer.scores.float().reshape(-1), extra) // m
    wins = torch.bincount(winners.cpu(), minlength=hkv).double()
    targets = layer.protected + (1 - alpha) * wins + alpha * extra / hkv
    lo = torch.full((hkv,), layer.floor)
    hi = torch.full((hkv,), layer.n)
    return round_to_total(targets, lo, hi, layer_total)


@dataclass
class AdaAllocator(Allocator):
    name = "ada"
    head_adaptive = True
    alpha: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0,
                                                "help": "share of each layer's budget spread uniformly over its heads"})
    schedule: str = field(default="uniform", metadata={"choices": ("uniform", "pyramid"),
                                                       "help": "layer budgets: uniform or PyramidKV's"})
    beta: float = field(default=20.0, metadata={"min": 1.0, "help": "PyramidKV's beta when schedule=pyramid"})

    def allocate(self, layers: list[LayerCandidates], total: int) -> list[list[int]]:
        if not floors_fit(layers, total):
            return uniform_counts(layers, total)
        if self.schedule == "pyramid":
            totals = pyramid_layer_totals(layers, total, self.beta)
        else:
            totals = uniform_layer_totals(layers, total)
        return [ada_head_counts(layer, t, self.alpha) for layer, t in zip(layers, totals)]

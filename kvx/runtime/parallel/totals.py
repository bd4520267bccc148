"""Whole-model figures on tensor-parallel ranks: each rank counts its own kv heads' entries and bytes; the
model's are the sum over ranks, a replicated kv head counted once. Every rank calls it at the same point
(one all-reduce); with one rank it returns the figures as they are."""

from __future__ import annotations

import torch


def whole_model(model, values: list[int]) -> list[int]:
    tp = getattr(model, "tp", None)
    if tp is None:
        return list(values)
    t = tp.all_reduce(torch.tensor(values, dtype=torch.long, device=tp.device))
    full = model.full_config.num_kv_heads
    copies = tp.world // full if full < tp.world else 1  # each kv head is held by this many ranks
    return [int(v) // copies for v in t.tolist()]

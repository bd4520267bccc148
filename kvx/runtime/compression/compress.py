"""Compression after a prefill: the policy selects what each (layer, kv head) keeps, the cache compacts.

The bytes held really shrink (the cache's compaction frees them); a decode-time policy gets its per-head
targets (SequenceState.head_budget) and, for H2O, the prefill's attention mass as the running score.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from kvx.kernels.stats import LayerStats
from kvx.runtime.compression.decode_eviction import DECODE_SLACK
from kvx.runtime.cache.paged_cache import PagedKVCache
from kvx.runtime.engine.state import SequenceState


@torch.inference_mode()
def compress(engine, req: SequenceState, headroom: int, budget=None, pool=None) -> None:
    """Select with the policy from the statistics of the last prefill, then compact the cache.

    `budget` overrides the request's (chunked prefill passes the per-head equivalent). `pool`: write the
    kept entries into a fresh cache in that pool instead of compacting in place, leaving req's cache as it
    was (a fork of a shared prefill: its cache is the shared one)."""
    n = req.cache.layers[0].lengths[0]
    cfg = engine.config
    budget = budget or req.budget
    track = req.decode_mode in ("accumulate", "last")
    if not req.compresses or budget.keeps_everything(n):
        if pool is not None:
            req.cache = PagedKVCache.copy_of(req.cache, pool, headroom, track_mass=track)
        else:
            req.cache.make_room(headroom)
        req.lengths_after_compress = req.cache.lengths()
        return
    t0 = time.perf_counter()
    keep = select_keep(engine, req.policy, list(req.stats), budget)
    t1 = time.perf_counter()
    mass_seed = None
    if req.decode_mode == "accumulate":
        mass_seed = [group_mass(engine, s) for s in req.stats]
    if req.decode_mode:
        headroom = min(headroom, DECODE_SLACK)
        req.head_budget = [[int(idx.numel()) for idx in layer] for layer in keep]
    if pool is not None:
        req.cache = PagedKVCache.copy_of(req.cache, pool, headroom, keep=keep, track_mass=track)
    else:
        req.cache.compact(keep, headroom)
    if mass_seed is not None:
        for lc, seed, layer_keep in zip(req.cache.layers, mass_seed, keep):
            for g, idx in enumerate(layer_keep):
                lc.set_head_mass(g, seed[g][idx.to(seed.device)])
    req.stats = [None] * cfg.num_layers  # statistics are consumed: free them
    req.timings.select_s += t1 - t0
    req.timings.compact_s += time.perf_counter() - t1
    req.lengths_after_compress = req.cache.lengths()


def select_keep(engine, policy, stats: list[LayerStats], budget) -> list[list[Tensor]]:
    """policy.select over the model's statistics: per layer, per kv head of this rank, the kept indices.
    On a tensor-parallel rank the statistics of every rank are gathered first (runtime/parallel/selection.py),
    so the choice is the one a single device makes."""
    if getattr(engine.model, "tp", None) is not None:
        from kvx.runtime.parallel.selection import select_across_ranks

        return select_across_ranks(policy, stats, budget, engine.model)
    cfg = engine.config
    return policy.select(stats, budget, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim)


def group_mass(engine, stats: LayerStats) -> Tensor:
    """[Hkv, n] attention mass per key summed over each group's query heads (H2O's running score)."""
    src = stats.colsum_all if stats.colsum_all is not None else stats.col_sum
    if src is None:
        return torch.zeros(engine.config.num_kv_heads, stats.n, device=engine.device)
    return src.reshape(engine.config.num_kv_heads, engine.group, -1).sum(1)

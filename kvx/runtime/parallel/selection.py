"""A compression's choice on tensor-parallel ranks, exactly as one device makes it.

Each rank holds the statistics of its own heads. Once per compression every rank all-gathers them (one
collective: every layer's requested fields packed into one flat buffer), so every rank sees the statistics
one device would have; the policy then selects over the whole model on every rank identically — the same
scores, the same allocation (Ada-KV's per-layer, LaProx's and the global allocator's model-wide top-K),
the same ties (broken by (layer, head, position), as on one device) — and each rank keeps its own kv heads'
indices. A replicated kv head (fewer kv heads than ranks) is counted once and chosen alike on every rank
that holds it. Decode-time eviction then stays local: each segment's choice reads only its own head (the
replicas of a replicated head sum their partial mass first: compression/batch_eviction.py).
"""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import torch
from torch import Tensor

from kvx.errors import KvxError
from kvx.kernels.stats import LayerStats

# LayerStats fields with one row per query head / per kv head; the rest are shared by every head.
_PER_QUERY_HEAD = ("col_sum", "col_sq", "last_row", "colsum_all", "col_sum_sg", "value_out_norm", "value_out_l1",
                   "q_mean", "q_cov", "col_max")
_PER_KV_HEAD = ("key_norm", "value_norm", "keys")
_SHARED = ("positions", "colsum_count")


def select_across_ranks(policy, stats: list[LayerStats], budget, model) -> list[list[Tensor]]:
    """Per layer, per local kv head: the indices to keep (what policy.select keeps for these heads on one
    device). `model` is the rank's Transformer (its tp group, shard and full config)."""
    full = model.full_config
    if (policy.decode_mode is not None and full.num_kv_heads < model.tp.world
            and policy.decode_rule(np.array([2]), np.array([1])) is None):
        # A replicated kv head's query heads are split among its ranks; the batched eviction round makes
        # their decode-time mass whole (batch_eviction._replicated), the per-segment decode_keep() cannot.
        raise KvxError(f"--tensor-parallel {model.tp.world}: policy {policy.name} evicts while decoding without "
                       f"a batched rule, which needs each kv head on one rank; this model has {full.num_kv_heads} "
                       f"kv heads (use at most {full.num_kv_heads} ranks)")
    whole = gather_stats(stats, model.tp, model.shard, full)
    keep = policy.select(whole, budget, full.num_kv_heads, full.num_heads, full.head_dim)
    lo, hi = model.shard.kv_lo, model.shard.kv_hi
    return [layer[lo:hi] for layer in keep]


def gather_stats(stats: list[LayerStats], tp, shard, full) -> list[LayerStats]:
    """The whole model's statistics from every rank's share (one all-gather)."""
    from kvx.models.sharding import shard_for

    for f in fields(LayerStats):
        value = getattr(stats[0], f.name)
        if isinstance(value, Tensor) and f.name not in _PER_QUERY_HEAD + _PER_KV_HEAD + _SHARED:
            raise RuntimeError(f"tensor parallel: LayerStats.{f.name} is neither per head nor shared")
    shards = [shard_for(full, r, tp.world) for r in range(tp.world)]
    local = _pack(stats)
    sizes = [_packed_size(stats, shard, s) for s in shards]
    assert sizes[tp.rank] == local.numel()
    width = max(sizes)
    padded = torch.zeros(width, dtype=torch.float32, device=local.device)
    padded[:local.numel()] = local
    parts = [p[:n] for p, n in zip(tp.all_gather(padded), sizes)]
    views = [_unpack(stats, shard, s, part) for s, part in zip(shards, parts)]
    out = []
    for layer, st in enumerate(stats):
        values = {}
        for name in _PER_QUERY_HEAD:
            if getattr(st, name) is not None:
                values[name] = torch.cat([v[layer][name] for v in views]).to(getattr(st, name).dtype)
        for name in _PER_KV_HEAD:
            if getattr(st, name) is not None:
                # Each kv head from the first rank that holds it (replicas hold the same values).
                rows = [views[_owner(shards, h)][layer][name][h - shards[_owner(shards, h)].kv_lo]
                        for h in range(full.num_kv_heads)]
                values[name] = torch.stack(rows).to(getattr(st, name).dtype)
        out.append(replace(st, **values))
    return out


def _owner(shards, h: int) -> int:
    return next(r for r, s in enumerate(shards) if s.kv_lo <= h < s.kv_hi)


def _rows(name: str, shard) -> int:
    return shard.q_heads if name in _PER_QUERY_HEAD else shard.kv_heads


def _pack(stats: list[LayerStats]) -> Tensor:
    parts = [getattr(st, name).reshape(-1).float() for st in stats for name in _PER_QUERY_HEAD + _PER_KV_HEAD
             if getattr(st, name) is not None]
    if not parts:
        return torch.zeros(0, dtype=torch.float32, device=stats[0].positions.device)
    return torch.cat(parts)


def _packed_size(stats: list[LayerStats], mine, shard) -> int:
    """How many floats rank `shard` packs (its heads; every other dimension as this rank's)."""
    total = 0
    for st in stats:
        for name in _PER_QUERY_HEAD + _PER_KV_HEAD:
            t = getattr(st, name)
            if t is not None:
                total += (t.numel() // _rows(name, mine)) * _rows(name, shard)
    return total


def _unpack(stats: list[LayerStats], mine, shard, flat: Tensor) -> list[dict[str, Tensor]]:
    out, at = [], 0
    for st in stats:
        layer = {}
        for name in _PER_QUERY_HEAD + _PER_KV_HEAD:
            t = getattr(st, name)
            if t is not None:
                shape = (_rows(name, shard), *t.shape[1:])
                count = t.numel() // _rows(name, mine) * _rows(name, shard)
                layer[name] = flat[at:at + count].reshape(shape)
                at += count
        out.append(layer)
    return out

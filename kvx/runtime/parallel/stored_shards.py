"""A stored context on tensor-parallel ranks: one file for the whole model, each rank holding its heads.

A `.kvc` file is the same whatever made it: `kvx compress --tp N` gathers every rank's kept entries into
the whole model's (rank 0 writes them), and `kvx generate --load-context --tp N` gives each rank its own kv
heads' share of a file, so a context compressed on N ranks answers on one device and the other way round.

A replicated kv head (fewer kv heads than ranks) is held by several ranks with the same entries, but each
replica attends with part of the head's query heads: its decode-time mass (H2O, TOVA) is a part of the
head's. The whole model's mass is the replicas' sum; a share gives each replica an equal part of it, so
the replicas' eviction rounds, which sum them again (compression/batch_eviction.py), rank the whole mass.
AhaKV's recent queries are per query head: the whole model's are every rank's in order, a share its own.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
import torch

from kvx.runtime.contexts.stored import StoredContext


def whole_context(parts: list[StoredContext], shards, num_kv_heads: int) -> StoredContext:
    """The whole model's StoredContext from every rank's (`parts[r]` holds `shards[r]`'s kv heads)."""
    first = parts[0]
    owners = [[r for r, s in enumerate(shards) if s.kv_lo <= h < s.kv_hi] for h in range(num_kv_heads)]
    keys, values, positions, masses = [], [], [], []
    for layer in range(first.num_layers):
        heads = [[_head(parts[r], shards[r], layer, h) for r in owners[h]] for h in range(num_kv_heads)]
        keys.append(torch.cat([copies[0]["k"] for copies in heads]))
        values.append(torch.cat([copies[0]["v"] for copies in heads]))
        positions.append(torch.cat([copies[0]["pos"] for copies in heads]))
        if first.mass is not None:  # a replicated head's mass: the sum of its replicas' parts
            masses.append(torch.cat([torch.stack([c["mass"] for c in copies]).sum(0) for copies in heads]))
    lengths = np.stack([parts[o[0]].lengths[:, h - shards[o[0]].kv_lo] for h, o in enumerate(owners)], axis=1)

    def per_head(name: str):  # a [layers, kv heads] table of ints, each head's from a rank holding it
        if name == "head_budget" and first.head_budget is None:
            return None
        return [[int(_table(parts[o[0]], name)[layer][h - shards[o[0]].kv_lo]) for h, o in enumerate(owners)]
                for layer in range(first.num_layers)]

    recent = None
    if first.recent_q is not None:  # [layers, H, r, d]: every rank's query heads, in order (replicas' too)
        recent = torch.cat([parts[r].recent_q for r in _query_owners(shards)], dim=1)
    return replace(first, keys=keys, values=values, positions=positions, lengths=lengths.astype(np.int64),
                   mass=masses if first.mass is not None else None, head_budget=per_head("head_budget"),
                   recent_q=recent, lengths_after_compress=per_head("lengths_after_compress"))


def rank_share(whole: StoredContext, shard, num_kv_heads: int, world: int) -> StoredContext:
    """The part of the whole model's StoredContext that rank `shard` holds."""
    lo, hi = shard.kv_lo, shard.kv_hi
    copies = world // num_kv_heads if num_kv_heads < world else 1  # ranks holding each kv head
    keys, values, positions, masses = [], [], [], []
    for layer in range(whole.num_layers):
        starts = np.concatenate([[0], np.cumsum(whole.lengths[layer])]).astype(int)
        a, b = int(starts[lo]), int(starts[hi])
        keys.append(whole.keys[layer][a:b].clone())
        values.append(whole.values[layer][a:b].clone())
        positions.append(whole.positions[layer][a:b].clone())
        if whole.mass is not None:
            masses.append(whole.mass[layer][a:b] / copies)
    H = None if whole.recent_q is None else whole.recent_q.shape[1]
    recent = None if H is None else whole.recent_q[:, shard.q_lo:shard.q_hi].clone()
    return replace(whole, keys=keys, values=values, positions=positions,
                   lengths=np.ascontiguousarray(whole.lengths[:, lo:hi]),
                   mass=masses if whole.mass is not None else None,
                   head_budget=None if whole.head_budget is None else [row[lo:hi] for row in whole.head_budget],
                   recent_q=recent,
                   lengths_after_compress=[row[lo:hi] for row in (whole.lengths_after_compress or whole.lengths.tolist())])


def share_of(model):
    """For ResidentContext(share=...): a function giving this rank's part of a whole model's context, or
    None on one device."""
    if getattr(model, "tp", None) is None:
        return None
    full = model.full_config
    return partial(rank_share, shard=model.shard, num_kv_heads=full.num_kv_heads, world=model.tp.world)


def gather_context(local: StoredContext, model) -> StoredContext | None:
    """Every rank calls it at the same point; rank 0 gets the whole model's StoredContext, the others None."""
    from kvx.models.sharding import shard_for

    full = model.full_config
    parts = model.tp.gather_objects(local)
    if parts is None:
        return None
    shards = [shard_for(full, r, model.tp.world) for r in range(model.tp.world)]
    return whole_context(parts, shards, full.num_kv_heads)


def _table(stored: StoredContext, name: str):
    value = getattr(stored, name)
    return value if value else stored.lengths.tolist()  # no lengths_after_compress (older files): the lengths


def _head(part: StoredContext, shard, layer: int, h: int) -> dict:
    g = h - shard.kv_lo
    starts = np.concatenate([[0], np.cumsum(part.lengths[layer])]).astype(int)
    a, b = int(starts[g]), int(starts[g + 1])
    out = {"k": part.keys[layer][a:b], "v": part.values[layer][a:b], "pos": part.positions[layer][a:b]}
    if part.mass is not None:
        out["mass"] = part.mass[layer][a:b]
    return out


def _query_owners(shards) -> list[int]:
    """The ranks whose query heads, concatenated in order, are the model's (each query head held once)."""
    out, at = [], 0
    for r, s in enumerate(shards):
        if s.q_lo == at and s.q_hi > at:
            out.append(r)
            at = s.q_hi
    return out

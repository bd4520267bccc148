"""A compressed context taken out of the pool: the kept entries per (layer, kv head), ragged, on the host.

What `kvx compress` writes, what a server keeps in host memory, and what is put back into a pool for the
requests that ask questions about it. The layout is the one a compressed cache holds: per layer every kv
head's kept keys, values and absolute positions one after the other (`[Σ_h kept_h, d]`), and the lengths
per (layer, kv head) that cut them apart. Positions are absolute: a question continues at `position`,
the context's next one, whatever was evicted.

A decode-time policy needs state to go on evicting while it answers: H2O's and TOVA's mass per kept key,
AhaKV's recent queries, and every policy's per-head targets (`head_budget`). They travel with the entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from kvx.runtime.cache.paged_cache import PagedKVCache
from kvx.runtime.cache.pool import BlockPool


@dataclass
class ContextInfo:
    """What a stored context was made from and how its questions are wrapped (a file's metadata)."""

    model_fingerprint: str
    tokenizer_fingerprint: str
    dtype: str  # "float32", "bfloat16", "float16"
    policy: dict  # {"name", "allocation" (or None), "args" {key: value}}: rebuilds the Policy
    budget: dict  # {"fraction": f} or {"tokens": n}: rebuilds the Budget exactly
    wrapping: dict  # {"raw": bool, "system": str | None}: how a question is encoded after the context
    context_tokens: int
    # What the linear weights ran as (the CPU may pack them: models/cpu_weights.py): keys and values made
    # by int8 weights are not what float32 weights make of the same text. "" (older files): as `dtype`.
    weights: str = ""
    kvx_version: str = ""
    created: str = ""  # ISO 8601, UTC

    def build_policy(self):
        """(Policy, Budget) as the context was compressed with; (None, None) for the full cache."""
        from kvx.policies.budget import Budget
        from kvx.policies.registry import build_policy

        if self.policy.get("name", "full") == "full":
            return None, None
        pol = build_policy(self.policy["name"], allocation=self.policy.get("allocation"),
                           args=self.policy.get("args") or {})
        return pol, Budget(**self.budget)

    @property
    def policy_label(self) -> str:
        name = self.policy.get("name", "full")
        if name == "full":
            return "full"
        b = self.budget
        budget = f"{b['fraction'] * 100:g}%" if "fraction" in b else str(b["tokens"])
        return f"{name} @ {budget}"


@dataclass
class StoredContext:
    """The kept cache of one compressed context, on the host (see the module docstring)."""

    keys: list[Tensor]  # per layer [Σ_h kept_h, d]
    values: list[Tensor]
    positions: list[Tensor]  # per layer [Σ_h kept_h] int64, each head's in increasing order
    lengths: np.ndarray  # [layers, kv heads] int64
    position: int  # the context's next absolute position (its token count)
    info: ContextInfo
    mass: list[Tensor] | None = None  # per layer [Σ_h kept_h] float32 (H2O, TOVA)
    head_budget: list[list[int]] | None = None  # decode-time targets per (layer, kv head)
    recent_q: Tensor | None = None  # AhaKV: [layers, H, r, d]
    lengths_after_compress: list[list[int]] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def num_kv_heads(self) -> int:
        return int(self.lengths.shape[1])

    @property
    def entries(self) -> int:
        return int(self.lengths.sum())

    def kv_bytes(self) -> int:
        """K + V bytes of the kept entries."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(self.keys, self.values))

    def blocks(self, block_size: int) -> int:
        """Blocks the context occupies in a pool of `block_size`-entry blocks (each segment rounded up)."""
        return int((-(-self.lengths // block_size)).sum())


def capture(req, info: ContextInfo) -> StoredContext:
    """The compressed cache of `req` (a SequenceState right after its context was compressed), copied to
    the host with the state a decode-time policy needs to go on."""
    cache = req.cache
    pool = cache.pool
    keys, values, positions, masses = [], [], [], []
    for lc in cache.layers:
        slots = torch.cat([lc.slots(g) for g in range(cache.num_kv_heads)])
        keys.append(pool.k_flat[slots].cpu().clone())
        values.append(pool.v_flat[slots].cpu().clone())
        positions.append(pool.pos_flat[slots].cpu().clone())
        if cache.track_mass:
            masses.append(pool.mass_flat[slots].cpu().clone())
    rq = req.recent_q
    if isinstance(rq, list):
        rq = None if not rq or rq[0] is None else torch.stack(list(rq))
    return StoredContext(
        keys=keys, values=values, positions=positions, lengths=cache.length_array.copy(),
        position=int(req.position), info=info, mass=masses if cache.track_mass else None,
        head_budget=None if req.head_budget is None else [list(map(int, h)) for h in req.head_budget],
        recent_q=None if rq is None else rq.cpu().clone(),
        lengths_after_compress=[list(map(int, row)) for row in (req.lengths_after_compress or cache.lengths())])


def into_pool(stored: StoredContext, pool: BlockPool, extra: int = 0) -> PagedKVCache:
    """The context's entries written into `pool` as a cache of their own, with room for `extra` more
    entries per segment. The caller has reserved the blocks."""
    track = stored.mass is not None
    cache = PagedKVCache(pool, stored.num_layers, stored.num_kv_heads, track_mass=track)
    cache.compacted = True  # heads hold different positions, as after any compaction
    dev = pool.device
    for layer, lc in enumerate(cache.layers):
        counts = stored.lengths[layer].tolist()
        for g, n in enumerate(counts):
            lc.resize(g, n + extra)
        lc.lengths = counts
        dst = torch.cat([lc.slots(g) for g in range(stored.num_kv_heads)])
        pool.k_flat[dst] = stored.keys[layer].to(dev, pool.dtype)
        pool.v_flat[dst] = stored.values[layer].to(dev, pool.dtype)
        pool.pos_flat[dst] = stored.positions[layer].to(dev)
        if track:
            pool.mass_flat[dst] = stored.mass[layer].to(dev, torch.float32)
    cache._note_peak()
    return cache

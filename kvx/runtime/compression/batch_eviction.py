"""Decode-time eviction ranked in tensor passes: every due segment of every sequence of a batched step at
once (evict_batch; evict_due adds the per-segment path for scorers without a rule).

decode_eviction.py brings one request back to budget a (layer, kv head) segment at a time: a few tensor
ops per segment, so at 21 sequences × 32 layers × 8 kv heads an eviction round is thousands of small ops
(on a GPU, kernel launches) every DECODE_SLACK steps — far more than the step itself. Here the due
segments of every request in the batch are evicted together, with a fixed number of tensor ops:

1. host (arrays, no per-segment Python but the block tables): the layers over budget + slack, and per
   segment of those layers its length n, its target and the policy's rule (Policy.decode_rule: `sinks`
   and `recent` protected, the rest ranked by attention mass) — the choice decode_keep() makes;
2. device: the segments' slots as one [rows, longest] matrix through their block tables, each row ranked
   by (protection priority, mass, index) with two stable sorts, the first `keep` of every row kept;
3. the kept entries move to the front of their own segments (every read before any write), the mass past
   the new lengths is zeroed, and every segment of an evicted layer then holds the blocks for kept +
   DECODE_SLACK entries, as compact_layer leaves it.

The unprotected entries are ranked by the scorer's decode_scores(): the attention mass for H2O and TOVA;
AhaKV's step-gain sums of the recent queries times its value prior, computed for all its rows at once.
A policy without a rule is handed back to the per-request path. On tensor-parallel ranks that share a
replicated kv head, the round first makes the mass and the recent queries whole (_replicated).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvx.runtime.compression.decode_eviction import DECODE_SLACK, evict_per_segment

# Entries × head_dim per pass, by device: bounds the temporaries (the gathered K / V of every kept entry that
# moves: at most 2 × 2^26 bf16 elements, 256 MiB, on a GPU, beside a KV pool that took most of the memory).
# On a CPU a larger pass is slower, not faster (the gathers leave the cache and fault in fresh pages: at 8B
# shapes one pass of every row took 1.7x the per-request path's time); a GPU wants few launches.
_PASS_ELEMENTS = {"cpu": 1 << 22}
_PASS_ELEMENTS_DEFAULT = 1 << 26
_SCORE_ENTRIES = 1 << 24  # rows × query rows × longest per decode_scores call (AhaKV's [rows, G, r, n])


@dataclass
class _Rows:
    """The segments one request evicts: (layer, kv head) of its due layers, row-major."""

    req: object
    layers: np.ndarray  # [rows] layer of each row
    heads: np.ndarray  # [rows] kv head
    n: np.ndarray  # [rows] entries held
    keep: np.ndarray  # [rows] entries kept: min(n, target)
    sinks: np.ndarray  # [rows] the rule's protected sinks
    recent: np.ndarray  # [rows] the rule's protected recent entries

    def part(self, lo: int, hi: int) -> "_Rows":
        return _Rows(self.req, self.layers[lo:hi], self.heads[lo:hi], self.n[lo:hi], self.keep[lo:hi],
                     self.sinks[lo:hi], self.recent[lo:hi])


def evict_batch(engine, reqs: list) -> list:
    """Evict, for every request in reqs (engine Requests over PagedKVCaches of one pool), the layers whose
    segments exceed their budget by DECODE_SLACK, as decode_evict would. Returns the requests whose
    policy has no batched rule: the caller evicts those one by one."""
    due, rest = [], []
    for req in reqs:
        rows = _rows_due(req, req.cache.length_array)
        if rows is None:
            rest.append(req)
        elif rows.n.size:
            due.append(rows)
    if due:
        pool = due[0].req.cache.pool
        longest = max(int(r.n.max()) for r in due)
        budget = max(1, _PASS_ELEMENTS.get(pool.device.type, _PASS_ELEMENTS_DEFAULT) // (longest * pool.head_dim))
        chunk, size = [], 0
        for rows in due:
            lo = 0
            while lo < rows.n.size:
                take = min(rows.n.size - lo, budget - size)
                chunk.append(rows.part(lo, lo + take))
                lo, size = lo + take, size + take
                if size == budget:
                    _evict(engine, chunk)
                    chunk, size = [], 0
        if chunk:
            _evict(engine, chunk)
    return rest


def evict_due(engine, reqs: list) -> None:
    """Every request in reqs back to budget: those whose policy has a batched rule in one pass, the others
    a segment at a time (decode_eviction.evict_per_segment)."""
    for req in evict_batch(engine, reqs):
        evict_per_segment(engine, req)


def _rows_due(req, lengths: np.ndarray) -> _Rows | None:
    """The segments of req's layers with a segment over budget + slack (lengths [layers, kv heads]); None
    if its policy has no rule."""
    targets = req.head_budget_array()
    layers = np.flatnonzero((lengths > targets + (DECODE_SLACK - 1)).any(axis=1))
    hkv = lengths.shape[1]
    n, keep = lengths[layers].ravel(), np.minimum(lengths[layers], targets[layers]).ravel()
    rule = req.policy.decode_rule(n, keep)
    if rule is None:
        return None
    # Where keep == n the row keeps everything whatever the rule says (decode_keep does not ask it).
    return _Rows(req, np.repeat(layers, hkv), np.tile(np.arange(hkv), layers.size), n, keep,
                 np.asarray(rule[0]), np.asarray(rule[1]))


def _evict(engine, due: list[_Rows]) -> None:
    pool = due[0].req.cache.pool
    B, dev = pool.block_size, pool.device
    tables_host = [c.layers[layer].tables[g] for r in due for c in (r.req.cache,)
                   for layer, g in zip(r.layers.tolist(), r.heads.tolist())]
    width = max(len(t) for t in tables_host)
    tables = torch.tensor([t + [pool.scratch] * (width - len(t)) for t in tables_host], dtype=torch.long,
                          device=dev)
    longest = int(max(r.n.max() for r in due))
    idx = torch.arange(longest, device=dev).unsqueeze(0)  # [1, longest]
    slots = tables.gather(1, (idx // B).expand(len(tables_host), -1)) * B + idx % B  # [rows, longest]
    tracked = np.concatenate([np.full(r.n.size, r.req.cache.track_mass) for r in due])
    _keep_and_move(engine, due, pool, slots, tracked)

    # Host: the new lengths; then every segment of an evicted layer holds the blocks for kept + slack,
    # shrinks first so the pool never holds more than before or after.
    resizes = []
    for r in due:
        cache = r.req.cache
        cache.length_array[r.layers, r.heads] = r.keep
        cache.compacted = True
        have = cache.capacity_array[r.layers, r.heads] // B
        want = -(-(r.keep + DECODE_SLACK) // B)
        for i in np.flatnonzero(want != have).tolist():
            resizes.append((bool(want[i] < have[i]), cache, int(r.layers[i]), int(r.heads[i]), int(r.keep[i])))
    resizes.sort(key=lambda x: not x[0])
    for _, cache, layer, g, count in resizes:
        cache.layers[layer].resize(g, count + DECODE_SLACK)
    for cache in {id(x[1]): x[1] for x in resizes if not x[0]}.values():
        cache._note_peak()


def _keep_and_move(engine, due: list[_Rows], store, slots, tracked: np.ndarray) -> None:
    """Device side of a round: rank every row, keep its first `keep`, move the kept entries to the front
    of the row's own slots (slots [rows, longest]: row i's entry j lives at slots[i, j], for j < its n),
    and zero the mass of the slots past the new lengths."""
    dev = slots.device
    cat = np.concatenate
    n, keep, sinks, recent = (torch.from_numpy(cat([getattr(r, f) for r in due]).astype(np.int64)).to(dev)
                              .unsqueeze(1) for f in ("n", "keep", "sinks", "recent"))
    tracked = torch.from_numpy(tracked).to(dev).unsqueeze(1)
    rows, longest = slots.shape
    idx = torch.arange(longest, device=dev).unsqueeze(0)  # [1, longest]
    valid = idx < n
    mass = store.mass_flat[slots].float() * (valid & tracked)
    tp = _replicated(engine)
    if tp is not None:  # each replica's mass sums its own part of the head's query heads
        mass = tp.sum_replicas(mass)
    scores = _scores(engine, due, store, slots, valid, mass, keep)

    # Priority: the sinks (0 .. sinks-1), then the recent ones most recent first, then the rest by score
    # (ties to the lower index), then the slots past the length. Sorting by score first and then, stably,
    # by priority orders each row exactly as decode_keep does; its first `keep` entries are kept.
    rank = torch.full_like(slots, longest)
    rank = torch.where((idx >= n - recent) & (idx >= sinks) & valid, sinks + (n - 1 - idx), rank)
    rank = torch.where(idx < sinks, idx, rank).masked_fill(~valid, longest + 1)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices
    order = by_score.gather(1, torch.sort(rank.gather(1, by_score), dim=1, stable=True).indices)
    kept = torch.zeros_like(valid).scatter_(1, order, idx.expand(rows, -1) < keep)

    # Kept entry i moves to (kept entries before it) in its own row; only the ones that shift move.
    new_idx = kept.long().cumsum(1) - 1
    moves = kept & (new_idx != idx)
    src = slots[moves]
    dst = slots.gather(1, new_idx.clamp(min=0))[moves]
    k, v, p, m = store.k_flat[src], store.v_flat[src], store.pos_flat[src], store.mass_flat[src]
    store.k_flat[dst], store.v_flat[dst], store.pos_flat[dst], store.mass_flat[dst] = k, v, p, m
    store.mass_flat[slots[valid & (idx >= keep)]] = 0.0  # slots past a length read zero mass


def _scores(engine, due: list[_Rows], store, slots, valid, mass, keep):
    """[rows, longest] ranking scores: the mass, replaced by the scorer's own decode_scores() for the rows
    of scorers that have one (AhaKV), computed per group of rows that share the scorer and query count."""
    from kvx.policies.base import DecodeBatch, Scorer  # local: policies load lazily

    scores = mass
    groups: dict[tuple, list] = {}
    start = 0
    for r in due:
        scorer = r.req.policy.scorer
        if type(scorer).decode_scores is not Scorer.decode_scores:
            shape = tuple(r.req.recent_q[0].shape) if _has_queries(r.req) else None
            groups.setdefault((repr(scorer), shape), []).append((start, r))
        start += r.n.size
    for members in groups.values():
        first = members[0][1].req
        scorer = first.policy.scorer
        idx = torch.cat([torch.arange(s, s + r.n.size) for s, r in members]).to(slots.device)
        queries = None
        if _has_queries(first):  # each row's group of query heads: [rows, G, r, d]
            H, r_len, d = first.recent_q[0].shape
            hkv = first.cache.num_kv_heads
            parts = []
            for _, r in members:
                rq = r.req.recent_q
                rq = rq if isinstance(rq, torch.Tensor) else torch.stack(list(rq))
                layers = torch.from_numpy(r.layers).to(rq.device)
                heads = torch.from_numpy(r.heads).to(rq.device)
                parts.append(rq[layers].view(-1, hkv, H // hkv, r_len, d)[torch.arange(len(heads), device=rq.device), heads])
            queries = torch.cat(parts)
            tp = _replicated(engine)
            if tp is not None:  # the head's whole group of query heads, from every replica
                queries = tp.gather_replicas(queries, dim=1)
        qpos = torch.cat([torch.full((r.n.size, 1), r.req.position - 1, dtype=torch.long) for _, r in members])
        qpos = qpos.to(slots.device)
        # Rows per call bounded so that a [rows, G, r, longest] score tensor stays near _SCORE_ENTRIES.
        per_row = slots.shape[1] * (1 if queries is None else queries.shape[1] * queries.shape[2])
        step = max(1, _SCORE_ENTRIES // per_row)
        if scores is mass:
            scores = mass.clone()
        for lo in range(0, idx.numel(), step):
            part = idx[lo:lo + step]
            sub = slots[part]
            batch = DecodeBatch(valid=valid[part], positions=store.pos_flat[sub], mass=mass[part], keep=keep[part],
                                query_position=qpos[lo:lo + step],
                                recent_queries=None if queries is None else queries[lo:lo + step],
                                head_dim=engine.config.head_dim, scale=engine.scale,
                                load_kv=lambda sub=sub: (store.k_flat[sub], store.v_flat[sub]))
            scores[part] = scorer.decode_scores(batch).to(scores.dtype)
    return scores


def _replicated(engine):
    """The tensor-parallel group when this rank's kv head is replicated (fewer kv heads than ranks), else
    None. A replica attends with part of its head's query heads, so its decode-time mass and recent
    queries are partial; the replicas hold the same entries and reach every eviction round together (rank
    0's steps), so each round sums their mass and gathers their queries, and every replica then ranks what
    one device ranks. The stored mass stays partial: a later round sums it again."""
    tp = getattr(getattr(engine, "model", None), "tp", None)  # (a test's stand-in engine has no model)
    return tp if tp is not None and tp.replicas is not None else None


def _has_queries(req) -> bool:
    rq = req.recent_q
    return rq is not None and len(rq) > 0 and rq[0] is not None and rq[0].shape[1] > 0

"""Chunked prefill: the prompt in chunks, evicting after each, so the cache holds about budget + chunk.

Between chunks the policy's scorer keeps the per-head budget uniformly in every head (statistics over
that chunk's queries); the final selection after the last chunk uses the policy's own allocator over the
survivors, with a per-head token budget equal to what the original budget means for the whole prompt.
"""

from __future__ import annotations

import time

from kvx.errors import KvxError
from kvx.runtime.compression.compress import select_keep
from kvx.runtime.engine.state import SequenceState
from kvx.runtime.compression.split_prefill import piece_bounds, prefill_pieces, rows_read


def prefill_chunks(engine, req: SequenceState, ids: list[int], chunk: int):
    """A chunked prefill one chunk at a time: a generator that yields after each chunk and returns
    (last logits, final budget); the batched engine runs other requests' decode steps in between."""
    from kvx.policies import Budget, Policy
    from kvx.policies.allocation import UniformAllocator

    n = len(ids)
    if chunk <= 0:
        raise KvxError("--prefill-chunk must be a positive number of tokens")
    if not req.compresses or req.budget.keeps_everything(n) or chunk >= n:
        # Nothing to evict between chunks: still a chunk per step, exactly (split_prefill.py), so a
        # full-cache prompt does not stall the batch's decode either.
        return (yield from prefill_pieces(engine, req, ids, chunk))
    if req.policy.request.colsum_all:
        raise KvxError(f"--prefill-chunk does not work with policy {req.policy.name}: its score sums "
                       "attention over every query of the prompt")
    if any(engine.config.sliding_window_for(i) is not None for i in range(engine.config.num_layers)):
        raise KvxError("--prefill-chunk is not supported for models with a sliding window")
    target = req.budget.per_head(n)
    budget = Budget(tokens=target)
    interim = Policy(req.policy.name, req.policy.scorer, UniformAllocator())
    cfg = engine.config
    logits = None
    # The last chunk holds at least the query rows the statistics read (SnapKV's window, ...): a shorter one
    # would score from fewer rows than the policy's own definition asks for (rows_read, as a split prefill).
    pieces = piece_bounds(n, chunk, rows_read(interim.request_for(budget, n)) or 1)
    for i, (start, end) in enumerate(pieces):
        part = ids[start:end]
        held = req.cache.layers[0].lengths[0]
        logits = engine.prefill(req, part, interim.request_for(budget, held + len(part)))
        if i == len(pieces) - 1:
            break
        if held + len(part) > target:
            t0 = time.perf_counter()
            keep = select_keep(engine, interim, list(req.stats), budget)
            t1 = time.perf_counter()
            req.cache.compact(keep, headroom=pieces[i + 1][1] - pieces[i + 1][0])
            req.timings.select_s += t1 - t0
            req.timings.compact_s += time.perf_counter() - t1
        req.stats = [None] * cfg.num_layers
        yield
    return logits, budget

"""Split prefill: one prompt prefilled a piece per engine step, with nothing evicted in between.

The batched engine runs a running sequence's decode step between the pieces, so a long prompt does not
stall everyone's decode for its whole prefill. Unlike `--prefill-chunk` (chunked_prefill.py), which
evicts after every chunk and so changes what is kept, a split prefill is exact: every piece's queries
attend over the whole cache so far, and the policy's statistics are taken in the last piece, which is
made long enough to hold every query row they read (SnapKV's window, TOVA's last row, AhaKV's rows;
the key- and value-side statistics read the whole cache). KVzip's reconstruction runs after the last
piece over the whole context, as after a one-shot prefill.

Statistics that sum over every query row of the prompt (H2O's column sums, ExpectedAttention's query
moments) would need every piece's rows: those prompts are prefilled in one step, as before.
"""

from __future__ import annotations

import time

import torch

from kvx.kernels.stats import StatsRequest
from kvx.runtime.engine.state import SequenceState

# Prompt tokens per engine step in the batched engine. On a GPU each piece's attention reads the cache so
# far gathered from the pool, so pieces are larger there: 8192 tokens of an 8B model are about 0.2 s of
# prefill by arithmetic (2 * 8e9 * 8192 FLOP at ~650 TFLOP/s; not measured yet), while on the CPU 512
# tokens of the default model take ~0.9 s on 2 cores (568 tokens/s, docs/benchmarks.md).
DEFAULT_PREFILL_STEP = {"cpu": 512, "cuda": 8192}


def default_prefill_step(device) -> int:
    return DEFAULT_PREFILL_STEP.get(torch.device(device).type, DEFAULT_PREFILL_STEP["cpu"])


def rows_read(stats_req: StatsRequest | None) -> int | None:
    """How many of the prompt's last query rows the statistics read (0: none); None when they read every
    row, so the prompt cannot be split."""
    if stats_req is None:
        return 0
    if stats_req.colsum_all or stats_req.query_moments:
        return None
    return max(stats_req.window, stats_req.sg_rows, 1 if stats_req.last_row else 0)


def piece_bounds(n: int, step: int, tail: int) -> list[tuple[int, int]]:
    """[start, end) of each piece: `step` tokens each, the last at least `tail` tokens long."""
    starts = list(range(0, n, step))
    last = min(starts[-1], max(0, n - tail))
    starts = [s for s in starts if s < last] + [last]
    return [(s, e) for s, e in zip(starts, starts[1:] + [n])]


def without_short_tail(pieces: list[tuple[int, int]], step: int) -> list[tuple[int, int]]:
    """`pieces` with a last piece shorter than half a step joined to the one before (so no piece is longer
    than 1.5 steps). A short piece costs a whole step's fixed work for few rows, and on the CPU a piece of
    64 rows or fewer runs the int8 weights' per-row kernel (models/cpu_weights.py): 1067 tokens as 512 + 555
    prefilled 2-3% faster than as 512 + 512 + 43 (benchmarks/prefill_pieces.py, docs/benchmarks.md)."""
    if len(pieces) > 1 and pieces[-1][1] - pieces[-1][0] < step // 2:
        return pieces[:-2] + [(pieces[-2][0], pieces[-1][1])]
    return pieces


def prefill_pieces(engine, req: SequenceState, ids: list[int], step: int | None):
    """A generator that prefills `ids` `step` tokens at a time, yielding between pieces, and returns
    (last logits, None) like ModelRunner.prefill_chunks; one piece when step is None or the statistics need
    every row."""
    n = len(ids)
    stats_req = engine.stats_request(req, n)
    tail = rows_read(stats_req)
    if not step or n <= step or tail is None:
        return engine.prefill(req, ids, stats_req), None
    pieces = without_short_tail(piece_bounds(n, step, tail), step)
    for start, end in pieces[:-1]:
        t0 = time.perf_counter()
        engine.forward(req, ids[start:end])
        req.timings.prefill_s += time.perf_counter() - t0
        yield
    start, _ = pieces[-1]
    return engine.prefill(req, ids[start:], stats_req, context_ids=ids), None

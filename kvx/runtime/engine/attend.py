"""The attention callback a request's forward pass hands the model: append to the cache, attend, record
statistics.

Prefill attends over the K/V just computed (or the uniform cache) and, when the request's policy asks,
writes that layer's statistics (ops.layer_stats: Triton on a GPU, so no n x n matrix is formed); a forward
after a compaction (a question over its compressed context, a chunk after an eviction) attends each kv head
over its own ragged segment. A one-token forward adds H2O/TOVA's per-key mass, as a decode step does.
The batched decode step (runtime/engine/batch_step.py) has an attend of its own over the block tables.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from kvx.kernels import ops
from kvx.kernels.stats import StatsRequest
from kvx.runtime.engine.state import SequenceState


def make_attend(engine, req: SequenceState, stats_req: StatsRequest | None) -> Callable:
    """The `attend` callback of a forward pass over req's cache (see the module docstring)."""
    cache = req.cache
    mode = req.decode_mode
    keep_recent = req.policy.window if mode == "recent_queries" else 0
    G = engine.group

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, q_pre: Tensor) -> Tensor:
        cache.append(layer, k, v, positions)
        lc = cache.layers[layer]
        T = q.shape[1]
        sw = engine.config.sliding_window_for(layer)
        if keep_recent:
            prev = req.recent_q[layer]
            rq = q if prev is None else torch.cat([prev, q], dim=1)
            req.recent_q[layer] = rq[:, -keep_recent:].clone()
        # The batched [Hkv, n, d] view carries one position vector (head 0's): after a compaction heads
        # hold different positions, which a sliding window's mask must see head by head.
        if lc.is_uniform() and (sw is None or not cache.compacted):
            # A fresh prompt: attend over the contiguous k, v just computed rather than the strided
            # cache view (same values; saves SDPA a copy).
            K, V, P = (k, v, positions) if lc.lengths[0] == T else lc.dense()
            out, _ = ops.attention(q, K, V, positions, P, engine.scale, sw)
            if stats_req is not None:
                t0 = time.perf_counter()
                req.stats[layer] = ops.layer_stats(
                    stats_req, q, K, V, positions, P, engine.scale, sw, q_pre,
                    gram=engine._gram(layer) if stats_req.value_out_norm else None,
                    o_proj_weight=engine.model.o_proj_weight(layer) if stats_req.value_out_l1 else None)
                req.timings.stats_s += time.perf_counter() - t0
            return out
        # Ragged cache (after compression): each kv head attends over its own segment.
        out = torch.empty_like(q)
        for g in range(cache.num_kv_heads):
            Kg, Vg, Pg = lc.head(g)
            out[g * G:(g + 1) * G], _ = ops.attention(
                q[g * G:(g + 1) * G], Kg.unsqueeze(0), Vg.unsqueeze(0), positions, Pg, engine.scale, sw)
        return out

    if mode not in ("accumulate", "last"):
        return attend

    def attend_with_mass(layer, q, k, v, positions, q_pre):
        out = attend(layer, q, k, v, positions, q_pre)
        if q.shape[1] == 1:
            sw = engine.config.sliding_window_for(layer)
            add_decode_mass(cache.layers[layer], q[:, 0], int(positions[0]), sw, engine.scale, G, mode)
        return out

    return attend_with_mass


def add_decode_mass(lc, q: Tensor, q_pos: int, sliding_window: int | None, scale: float, G: int, mode: str) -> None:
    """H2O / TOVA statistics of one decode step: each key's probability summed over its group, added to
    (accumulate) or written over (last) the head's mass; a key the window hides gets 0."""
    for g in range(len(lc.lengths)):
        K, _, P = lc.head(g)
        logits = (q[g * G:(g + 1) * G].float() @ K.float().T) * scale
        visible = P <= q_pos
        if sliding_window is not None:
            visible &= (q_pos - P) < sliding_window
        probs = torch.softmax(logits.masked_fill(~visible[None, :], float("-inf")), dim=-1).nan_to_num(0.0)
        mass = probs.sum(0)
        lc.set_head_mass(g, mass if mode == "last" else lc.head_mass(g) + mass)

"""One decode step for many sequences at once: the model runs over [S] tokens, attention over each
(sequence, kv head) segment of the shared pool.

The model has no batch dimension; it does not need one. S sequences' next tokens go through it as S
"tokens" with their own positions: embeddings, projections, RoPE, MLP and the LM head run once over
[S, D], so the weights are read once per step for the whole batch. Only attention differs: the `attend`
given to the model appends token s's K/V to sequence s's segments and attends each segment through its
block table (ops.paged_decode_attention: Triton on a GPU, the PyTorch reference elsewhere).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvx.kernels import ops

_MASS_MODE = {"accumulate": 1, "last": 2}  # paged_decode_attention's mass_mode codes


def decode_step(engine, reqs: list, tokens: list[int]) -> Tensor:
    """Feed tokens[i] to reqs[i] (engine Requests over PagedKVCaches of one pool); returns logits [S, V]."""
    dev = engine.device
    for r in reqs:
        r.cache.reserve(1)  # a no-op when admission reserved the headroom (the usual case)
    ids = torch.tensor(tokens, dtype=torch.long, device=dev)
    positions = torch.tensor([r.position for r in reqs], dtype=torch.long, device=dev)
    logits = engine.model(ids, positions, _batch_attend(engine, reqs, positions))
    for r in reqs:
        r.position += 1
    return logits


def _batch_attend(engine, reqs: list, positions: Tensor):
    cfg = engine.config
    Hkv, G, d = cfg.num_kv_heads, engine.group, cfg.head_dim
    pool = reqs[0].cache.pool
    B = pool.block_size
    dev = engine.device
    S = len(reqs)
    modes = [_MASS_MODE.get(r.decode_mode, 0) for r in reqs]
    mass_mode = torch.tensor(modes, dtype=torch.int32, device=dev).repeat_interleave(Hkv) if any(modes) else None
    recent = [r.policy.window if r.decode_mode == "recent_queries" else 0 for r in reqs]
    q_pos = positions.repeat_interleave(Hkv)

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, q_pre: Tensor) -> Tensor:
        lcs = [r.cache.layers[layer] for r in reqs]
        # Append: entry `length` of every segment, in (sequence, kv head) order.
        slots = torch.tensor([t[n // B] * B + n % B for lc in lcs for t, n in zip(lc.tables, lc.lengths)],
                             dtype=torch.long, device=dev)
        pool.k_flat[slots] = k.transpose(0, 1).reshape(S * Hkv, d).to(pool.dtype)
        pool.v_flat[slots] = v.transpose(0, 1).reshape(S * Hkv, d).to(pool.dtype)
        pool.pos_flat[slots] = q_pos
        for lc in lcs:
            lc.lengths = [n + 1 for n in lc.lengths]
        width = max(len(t) for lc in lcs for t in lc.tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for lc in lcs for t in lc.tables],
                              dtype=torch.int32, device=dev)
        lengths = torch.tensor([n for lc in lcs for n in lc.lengths], dtype=torch.int32, device=dev)
        qs = q.transpose(0, 1).reshape(S * Hkv, G, d)
        out = ops.paged_decode_attention(
            qs, pool.k, pool.v, tables, lengths, engine.scale,
            mass_pool=pool.mass if mass_mode is not None else None, mass_mode=mass_mode,
            pos_pool=pool.pos, q_pos=q_pos, sliding_window=cfg.sliding_window_for(layer), max_len=width * B)
        for i, r in enumerate(reqs):
            if recent[i]:  # AhaKV scores with the last r queries of each head
                prev = r.recent_q[layer]
                rq = q[:, i:i + 1] if prev is None else torch.cat([prev, q[:, i:i + 1]], dim=1)
                r.recent_q[layer] = rq[:, -recent[i]:].clone()
        return out.reshape(S, Hkv * G, d).transpose(0, 1)

    return attend

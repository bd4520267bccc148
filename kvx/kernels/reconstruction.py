"""KVzip's reconstruction attention: a pass's attention output and its column max in one sweep.

A reconstruction pass (kvx/runtime/compression/reconstruction.py) feeds T tokens after an n-token context.
Its queries attend over every context key plus their own keys (causal among themselves), and its score is
the column max of a second softmax over a subset of those keys: the sinks [0, s), the chunk [start, end)
and the pass's own keys. The plain way (`reconstruction_attention_plain`, the oracle) forms the attention
over all n + T keys with an explicit mask and then, for the score, the subset's logits and softmax again.

`reconstruction_attention` (the CPU path) splits the keys in two:

- A = sinks + chunk + own keys. Its logits are formed once, row chunk by row chunk, and only over the own
  keys a row can see; their softmax is exactly the score's softmax, so the column max is read off it and
  the same probabilities times V are A's share of the attention output (with A's log-sum-exp).
- B = the rest of the context. Every pass query sees all of it, so it needs no mask: one unmasked flash
  attention (PyTorch's CPU kernel, which also returns the rows' log-sum-exp).

The two partial outputs are merged by their log-sum-exps. Nothing is computed twice: the subset's logits
and softmax serve both the score and the output, no [T, n + T] mask is built, and the causal half of the
own keys is skipped. The output equals the plain attention up to float rounding (the softmax over all keys
regrouped), the scores the plain column max likewise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvx.kernels.reference import attention

ROW_CHUNK = 128  # pass rows per sweep of A: [Hkv, G, 128, a + T] float32 stays a few MB


def scored_keys(n: int, sinks: int, start: int, end: int, own: int, device) -> Tensor:
    """Indices into the context + own keys [n + own] of the score's softmax: sinks, chunk, own keys."""
    return torch.cat([torch.arange(sinks, device=device), torch.arange(start, end, device=device),
                      torch.arange(n, n + own, device=device)])


def reconstruction_attention_plain(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                                   sinks: int, start: int, end: int, scale: float,
                                   row_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out [H, T, d], col_max [H, sinks + end - start] float32) the plain way.

    k, v: [Hkv, n + T, d], the context's keys (positions k_pos[:n] < q_pos[0]) then the pass's own (at
    q_pos). out is the attention over all of them (causal by position); col_max the max over the rows of
    (row_weight *) the softmax over exactly the sinks [0, sinks), the chunk [start, end) and the own keys,
    for the sinks and the chunk."""
    from kvx.kernels import ops

    T = q.shape[1]
    n = k.shape[1] - T
    out, _ = ops.attention(q, k, v, q_pos, k_pos, scale, None)
    sub = scored_keys(n, sinks, start, end, T, q.device)
    cm = ops.column_max(q, k[:, sub], q_pos, k_pos[sub], scale, row_weight)
    return out, cm[:, :sinks + end - start]


def _cpu_flash():
    """PyTorch's CPU flash-attention op, (out, lse, ...) = op(q, k, v, dropout, causal, scale=), or None."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _flash_with_lse(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Unmasked attention of q [Hkv, R, d] over k, v [Hkv, S, d] (every row sees every key):
    (out [Hkv, R, d], lse [Hkv, R] float32)."""
    flash = _cpu_flash()
    if q.device.type == "cpu" and flash is not None:  # PyTorch's CPU flash kernel, which also returns the lse
        out, lse = flash(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, False, scale=scale)[:2]
        return out.squeeze(0), lse.squeeze(0).float()
    R = q.shape[1]
    pos_q = torch.full((R,), k.shape[1], device=q.device)
    out, lse = attention(q, k, v, pos_q, torch.arange(k.shape[1], device=q.device), scale, None, need_lse=True)
    return out, lse


def reconstruction_attention(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, k_own: Tensor, v_own: Tensor,
                             sinks: int, start: int, end: int, scale: float,
                             row_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out [H, T, d] in q's dtype, col_max [H, sinks + end - start] float32), as
    reconstruction_attention_plain over k = [k_ctx, k_own] (every context key visible to every pass row,
    the own keys causal), without the mask and without forming the subset's logits twice.

    q: [H, T, d]; k_ctx, v_ctx: [Hkv, n, d] (the context, read only); k_own, v_own: [Hkv, T, d];
    0 <= sinks <= start <= end <= n; row_weight: [T] (KVzip+) or None."""
    H, T, d = q.shape
    Hkv, n, _ = k_ctx.shape
    G = H // Hkv
    a = sinks + end - start  # scored context keys
    # q * scale: exact for a power-of-two scale (head_dim 64: 1/8), else a rounding of the logits' scale
    qs = (q.reshape(Hkv, G, T, d).float() * scale)
    kAt = torch.cat([k_ctx[:, :sinks], k_ctx[:, start:end], k_own], dim=1).float().transpose(1, 2)  # [Hkv, d, a+T]
    vA = torch.cat([v_ctx[:, :sinks], v_ctx[:, start:end], v_own], dim=1).float()  # [Hkv, a + T, d]
    best = qs.new_zeros(Hkv, G, a)
    out_a = qs.new_empty(Hkv, G, T, d)
    lse_a = qs.new_empty(Hkv, G, T)
    idx = torch.arange(ROW_CHUNK, device=q.device)
    hidden = idx[None, :] > idx[:, None]  # own key j is hidden from row i of a chunk when j > i
    for t0 in range(0, T, ROW_CHUNK):
        t1 = min(T, t0 + ROW_CHUNK)
        rows = t1 - t0
        width = a + t1  # own keys past row t1 - 1 are never visible to these rows
        logits = torch.bmm(qs[:, :, t0:t1].reshape(Hkv, G * rows, d), kAt[:, :, :width]).view(Hkv, G, rows, width)
        logits[..., a + t0:].masked_fill_(hidden[:rows, :rows], float("-inf"))  # own keys t0..t1-1: causal
        row_max = logits.amax(dim=-1)
        p = torch.softmax(logits, dim=-1)
        # lse = row max + log(sum exp(l - row max)), and the largest probability is exactly 1 / that sum
        lse_a[:, :, t0:t1] = row_max - torch.log(p.amax(dim=-1))
        scored = p[..., :a]
        if row_weight is not None:
            scored = scored * row_weight[t0:t1].float().to(p.device).view(1, 1, rows, 1)
        best = torch.maximum(best, scored.amax(dim=2))
        out_a[:, :, t0:t1] = torch.bmm(p.view(Hkv, G * rows, width), vA[:, :width]).view(Hkv, G, rows, d)
    out = out_a
    if a < n:  # B: the context keys outside the score's subset, seen whole by every row
        kB = torch.cat([k_ctx[:, sinks:start], k_ctx[:, end:]], dim=1)
        vB = torch.cat([v_ctx[:, sinks:start], v_ctx[:, end:]], dim=1)
        out_b, lse_b = _flash_with_lse(q.reshape(Hkv, G * T, d), kB, vB, scale)
        out_b, lse_b = out_b.reshape(Hkv, G, T, d).float(), lse_b.reshape(Hkv, G, T)
        lse = torch.logaddexp(lse_a, lse_b)
        out = out_a * torch.exp(lse_a - lse).unsqueeze(-1) + out_b * torch.exp(lse_b - lse).unsqueeze(-1)
    return out.reshape(H, T, d).to(q.dtype), best.reshape(H, a)


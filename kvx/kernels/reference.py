"""Plain-PyTorch attention and cache kernels.

These are the CPU path and the oracle for the Triton kernels in this package: every Triton kernel has a
twin here with the same signature. Shapes carry no batch dimension (kvx runs one sequence at a time):
queries are [H, T, d], keys and values [Hkv, S, d]; query head h reads kv head h // (H // Hkv).

The ragged cache stores, per layer, flat pools K, V [slots, d] and positions [slots]; kv head g owns the
segment [start[g], start[g] + capacity[g]) of which the first length[g] slots are filled, in position order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Queries per chunk when a softmax must be formed explicitly: bounds memory at O(chunk * S) per head.
QUERY_CHUNK = 256


def visibility_mask(q_pos: Tensor, k_pos: Tensor, sliding_window: int | None) -> Tensor:
    """[T, S] bool: key j is visible to query i (causal by position, optionally windowed)."""
    diff = q_pos[:, None] - k_pos[None, :]
    visible = diff >= 0
    if sliding_window is not None:
        visible &= diff < sliding_window
    return visible


def _is_plain_causal(q_pos: Tensor, k_pos: Tensor) -> bool:
    """True when the queries are exactly the keys (positions 0..n-1 style prefill of a fresh sequence)."""
    return q_pos.shape[0] == k_pos.shape[0] and bool(torch.equal(q_pos, k_pos))


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    scale: float,
    sliding_window: int | None = None,
    need_lse: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Causal GQA attention by position. Returns (out [H, T, d], lse [H, T] float32 or None).

    lse is the natural-log log-sum-exp of each row's scaled logits over its visible keys.
    """
    H, T, d = q.shape
    Hkv, S, _ = k.shape
    if need_lse:
        return _attention_explicit(q, k, v, q_pos, k_pos, scale, sliding_window)
    mask = None
    is_causal = False
    if sliding_window is None and _is_plain_causal(q_pos, k_pos):
        is_causal = True
    elif sliding_window is not None or bool((k_pos > q_pos.min()).any()):
        mask = visibility_mask(q_pos, k_pos, sliding_window)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
        attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=H != Hkv,
    )
    return out.squeeze(0), None


def _attention_explicit(q, k, v, q_pos, k_pos, scale, sliding_window):
    H, T, d = q.shape
    Hkv, S, _ = k.shape
    G = H // Hkv
    qg = q.reshape(Hkv, G, T, d)
    out = torch.empty_like(q).reshape(Hkv, G, T, d)
    lse = torch.empty(Hkv, G, T, dtype=torch.float32, device=q.device)
    for t0 in range(0, T, QUERY_CHUNK):
        t1 = min(T, t0 + QUERY_CHUNK)
        logits = torch.matmul(qg[:, :, t0:t1].float(), k.float().unsqueeze(1).transpose(-1, -2)) * scale
        visible = visibility_mask(q_pos[t0:t1], k_pos, sliding_window)
        logits = logits.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(logits, dim=-1)
        probs = torch.exp(logits - row_lse.unsqueeze(-1))
        out[:, :, t0:t1] = torch.matmul(probs, v.float().unsqueeze(1)).to(q.dtype)
        lse[:, :, t0:t1] = row_lse
    return out.reshape(H, T, d), lse.reshape(H, T)


def append_entries(k_pool: Tensor, v_pool: Tensor, pos_pool: Tensor, tables: Tensor, lengths: Tensor,
                   k: Tensor, v: Tensor, pos: Tensor) -> None:
    """Write each segment's new last entry: k[i], v[i] (and position pos[i]) at entry lengths[i] - 1 of
    segment i (its block tables[i, j // B], slot j % B): a decode step's one new token per segment."""
    B, d = k_pool.shape[1], k_pool.shape[2]
    before = lengths.long() - 1
    rows = torch.arange(tables.shape[0], device=tables.device)
    slots = tables[rows, before // B].long() * B + before % B
    k_pool.view(-1, d)[slots] = k.to(k_pool.dtype)
    v_pool.view(-1, d)[slots] = v.to(v_pool.dtype)
    pos_pool.view(-1)[slots] = pos


def paged_decode_attention(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    tables: Tensor,
    lengths: Tensor,
    scale: float,
    *,
    mass_pool: Tensor | None = None,
    mass_mode: Tensor | None = None,
    pos_pool: Tensor | None = None,
    q_pos: Tensor | None = None,
    sliding_window: int | None = None,
    max_len: int | None = None,
    row_starts: list[int] | None = None,
) -> Tensor:
    """One query token per head over paged segments: the batched decode step's attention.

    q: [N, G, d], the G query heads of each of N segments (a segment is one (sequence, kv head));
    k_pool, v_pool: [blocks, B, d]; tables: [N, max_blocks] int32 block ids (entries past a segment's
    length are ignored); lengths: [N] int32. Returns out [N, G, d] in q's dtype; an empty segment gives zeros.
    mass_pool [blocks, B] float32 with mass_mode [N] int32 (0: leave, 1: add, 2: replace) receives each key's
    probability summed over its G heads (H2O accumulates, TOVA keeps the last step's; a key the window
    hides gets 0). With sliding_window,
    pos_pool [blocks, B] and q_pos [N] hide keys at q_pos - pos >= window. max_len (an upper bound on the
    lengths) sizes the Triton grid and is not needed here. row_starts: each segment's first slot when its
    blocks are known to be consecutive (read as slices, the tables unchecked).
    """
    N = q.shape[0]
    if N == 0:
        return torch.zeros_like(q)
    lens = lengths.long().tolist()  # a host sync is free here
    kw = dict(pos_pool=pos_pool, sliding_window=sliding_window, mass_pool=mass_pool)
    plain = sliding_window is None and (mass_mode is None or mass_pool is None or not bool(mass_mode.any()))
    if N <= _SLICED_ROWS_MAX or (plain and row_starts is not None):
        starts = row_starts if row_starts is not None else _consecutive_starts(tables, lengths, k_pool.shape[1])
        # A batch is read as slices too when its segments form few strided runs (each sequence's kv heads,
        # its cache allocated in one piece): no gather of whole blocks (2.3x at 16 x 1k on the CPU).
        runs = _strided_runs(starts, lens) if starts is not None and plain else None
        if starts is not None and (N <= _SLICED_ROWS_MAX or 2 * len(runs) <= N):
            return _sliced_rows(q, k_pool, v_pool, starts, lens, scale, mass_mode=mass_mode, q_pos=q_pos,
                                runs=runs, **kw)
    # Segments of very different lengths (a full cache beside 5% ones) would all be padded to the longest:
    # attend them in groups whose lengths are within 2x of each other's longest (a host sync is free here).
    order = sorted(range(N), key=lambda i: -lens[i])
    groups, top = [[]], max(lens)
    for i in order:
        if groups[-1] and 2 * lens[i] < top:
            groups.append([])
            top = lens[i]
        groups[-1].append(i)
    if len(groups) == 1:
        return _paged_rows(q, k_pool, v_pool, tables, lengths, scale, mass_mode=mass_mode, q_pos=q_pos, **kw)
    out = torch.zeros_like(q)
    for rows in groups:
        if lens[rows[0]] == 0:
            continue  # empty segments: zeros
        idx = torch.tensor(rows, device=q.device)
        out[idx] = _paged_rows(q[idx], k_pool, v_pool, tables[idx], lengths[idx], scale,
                               mass_mode=None if mass_mode is None else mass_mode[idx],
                               q_pos=None if q_pos is None else q_pos[idx], **kw)
    return out


# A few segments (a lone sequence's kv heads) whose blocks follow each other in the pool are read as slices
# of it, as one contiguous cache would be: no gather of whole blocks per step. A large batch is faster
# gathered at once (one matmul for every segment).
_SLICED_ROWS_MAX = 16


def _consecutive_starts(tables: Tensor, lengths: Tensor, B: int) -> list[int] | None:
    """Each segment's first pool slot when every segment's blocks are consecutive ids, else None."""
    nb = (lengths.long() + B - 1) // B  # blocks each segment uses
    W = tables.shape[1]
    if W > 1:
        steps = tables[:, 1:].long() - tables[:, :-1].long()
        used = torch.arange(W - 1, device=tables.device)[None, :] < (nb[:, None] - 1)
        if not bool(((steps == 1) | ~used).all()):
            return None
    return (tables[:, 0].long() * B).tolist()


def _strided_runs(starts: list[int], lens: list[int]) -> list[tuple[int, int, int, int]]:
    """The segments as maximal runs (begin, end, stride, length): within a run every segment has the same
    nonzero length and starts a fixed stride (at least that length) after the previous one, so the run is
    one strided view of the pool. Empty segments belong to no run."""
    runs = []
    i, N = 0, len(starts)
    while i < N:
        n = lens[i]
        if n == 0:
            i += 1
            continue
        j, stride = i + 1, n
        if j < N and lens[j] == n and starts[j] - starts[i] >= n:
            stride = starts[j] - starts[i]
            while j < N and lens[j] == n and starts[j] - starts[j - 1] == stride:
                j += 1
        runs.append((i, j, stride, n))
        i = j
    return runs


def _sliced_rows(q, k_pool, v_pool, starts, lens, scale, *, mass_pool, mass_mode, pos_pool, q_pos,
                 sliding_window, runs=None) -> Tensor:
    """paged_decode_attention for segments that are slices of the pool (_consecutive_starts); `runs`: their
    _strided_runs when the caller has them."""
    d = q.shape[-1]
    k_flat, v_flat = k_pool.view(-1, d), v_pool.view(-1, d)
    modes = None if mass_mode is None or mass_pool is None else mass_mode.tolist()
    if sliding_window is None and not (modes and any(modes)):
        # Runs of segments with equal lengths, each a fixed stride after the last (a sequence's kv heads: its
        # cache was allocated in one piece): batched matmuls over one [run, n, d] view of the pool each,
        # instead of four ops per segment (1.6x at 4k on the CPU for a lone request). The same ops as
        # _paged_rows on the same shapes, so a request's tokens do not depend on where the pool put its
        # blocks or on its neighbours (a fused SDPA, as fast, rounds differently).
        out = torch.zeros_like(q)
        for a, b, stride, n in runs if runs is not None else _strided_runs(starts, lens):
            shape, steps = (b - a, n, d), (stride * d, d, 1)
            k = k_flat.as_strided(shape, steps, k_flat.storage_offset() + starts[a] * d).float()
            v = v_flat.as_strided(shape, steps, v_flat.storage_offset() + starts[a] * d).float()
            logits = torch.matmul(q[a:b].float(), k.transpose(1, 2)) * scale
            out[a:b] = torch.matmul(torch.softmax(logits, dim=-1), v).to(q.dtype)
        return out
    out = torch.zeros_like(q)
    for i, (s, n) in enumerate(zip(starts, lens)):
        if n == 0:
            continue
        logits = (q[i].float() @ k_flat[s:s + n].float().T) * scale
        if sliding_window is not None:
            hidden = (q_pos[i].to(pos_pool.device) - pos_pool.view(-1)[s:s + n]) >= sliding_window
            logits = logits.masked_fill(hidden[None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        out[i] = (probs @ v_flat[s:s + n].float()).to(q.dtype)
        if modes is not None and modes[i]:
            mass = mass_pool.view(-1)[s:s + n]
            if modes[i] == 2:
                mass.copy_(probs.sum(0))
            else:
                mass += probs.sum(0)
    return out


def _paged_rows(q, k_pool, v_pool, tables, lengths, scale, *, mass_pool, mass_mode, pos_pool, q_pos,
                sliding_window) -> Tensor:
    """paged_decode_attention over segments padded to the longest of them."""
    N, G, d = q.shape
    B = k_pool.shape[1]
    L = min(int(lengths.max()), tables.shape[1] * B)
    out = torch.zeros_like(q)
    if L == 0:
        return out
    dev = q.device
    nb = -(-L // B)
    blocks = tables.long()[:, :nb]
    ar = torch.arange(L, device=dev)
    slots = (blocks[:, :, None] * B + torch.arange(B, device=dev)).reshape(N, nb * B)[:, :L]  # [N, L]
    in_segment = ar[None, :] < lengths.to(dev).long()[:, None]
    valid = in_segment
    if sliding_window is not None:
        k_pos = pos_pool[blocks].reshape(N, nb * B)[:, :L]
        valid = in_segment & ((q_pos.to(dev).long()[:, None] - k_pos) < sliding_window)
    # Whole blocks are gathered (one index per block, not per key). Slots past a length hold stale but finite
    # values (the pool zeroes a block when it hands it out): their zero probabilities zero them out.
    k = k_pool[blocks].reshape(N, nb * B, d)[:, :L].float()
    v = v_pool[blocks].reshape(N, nb * B, d)[:, :L].float()
    logits = torch.matmul(q.float(), k.transpose(1, 2)) * scale
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # an empty row softmaxes to NaN: make it zeros
    out = torch.matmul(probs, v).to(q.dtype)
    if mass_pool is not None and mass_mode is not None:
        flat = mass_pool.view(-1)
        mass = probs.sum(1)
        mode = mass_mode.to(dev).long()[:, None].expand(N, L)
        rep = in_segment & (mode == 2)  # a key hidden by the window got no attention this step: 0
        flat[slots[rep]] = mass[rep]
        add = in_segment & (mode == 1)
        flat.index_add_(0, slots[add], mass[add])
    return out

"""Paged ragged decode attention in Triton: the batched decode step's attention over the shared pool.

Twin of reference.paged_decode_attention. A segment is one (sequence, kv head): its G query heads share one
pass over its keys, read a tile at a time through its block table (a tile is TILE_BLOCKS whole blocks of
BLOCK_N = the pool's block size keys; with one block a tile reads one table entry). Long segments are
split: program (split, segment) covers `chunk` keys (a whole number of tiles) and writes a partial (max, sum-exp,
unnormalised output); triton_combine's kernel merges the partials per query row.

The grid depends only on the host bound max_len and the number of segments, never on the lengths, and
nothing syncs with the host: with tables and lengths in static device buffers the call can be captured in
a CUDA graph. With mass_mode, the split pass also stores each row's scaled logits and a third kernel turns
them into probabilities, summed over the group, added to (mode 1) or written over (mode 2) the pool's
per-key mass: H2O's and TOVA's decode-time statistics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvx.kernels.triton_attention import LOG2E, dot_precision
from kvx.kernels.triton_combine import COMBINE_BLOCK, TARGET_PROGRAMS, _decode_combine_kernel


@triton.jit
def _paged_split_kernel(
    Q, K, V, POS, TABLES, SEG_LEN, Q_POS, M_PART, L_PART, ACC_PART, LOGITS,
    stride_qn, stride_qg, stride_tn, qk_scale, chunk, num_splits, max_len, window,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, TILE_BLOCKS: tl.constexpr, STORE_LOGITS: tl.constexpr, SLIDING: tl.constexpr,
    PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    seg = tl.program_id(1)
    seg_len = tl.load(SEG_LEN + seg)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seg_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_N * TILE_BLOCKS)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + seg.to(tl.int64) * stride_qn + offs_g[:, None] * stride_qg + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if SLIDING:
        q_pos = tl.load(Q_POS + seg)
    rows = seg.to(tl.int64) * GROUP + offs_g

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for j0 in range(lo, hi, BLOCK_N * TILE_BLOCKS):
        offs_n = j0 + offs_t
        n_ok = offs_n < hi
        if TILE_BLOCKS == 1:  # one block: one table entry for the whole tile
            block = tl.load(TABLES + seg.to(tl.int64) * stride_tn + j0 // BLOCK_N).to(tl.int64)
            slots = block * BLOCK_N + offs_t
        else:  # several blocks: each key looks its block up
            blocks = tl.load(TABLES + seg.to(tl.int64) * stride_tn + offs_n // BLOCK_N, mask=n_ok, other=0)
            slots = blocks.to(tl.int64) * BLOCK_N + offs_n % BLOCK_N
        if SLIDING:
            k_pos = tl.load(POS + slots, mask=n_ok, other=0)
            n_ok = n_ok & ((q_pos - k_pos) < window)
        kt = tl.load(K + slots[None, :] * HEAD_DIM + offs_d[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        if STORE_LOGITS:
            tl.store(LOGITS + rows[:, None] * max_len + offs_n[None, :], s,
                     mask=g_ok[:, None] & (offs_n < hi)[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slots[:, None] * HEAD_DIM + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new

    part = rows * num_splits + split
    tl.store(M_PART + part, m_i, mask=g_ok)
    tl.store(L_PART + part, l_i, mask=g_ok)
    tl.store(ACC_PART + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def _paged_mass_kernel(
    LOGITS, LSE2, TABLES, SEG_LEN, MODE, MASS, stride_tn, max_len,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block_idx = tl.program_id(0)
    seg = tl.program_id(1)
    mode = tl.load(MODE + seg)
    seg_len = tl.load(SEG_LEN + seg)
    j0 = block_idx * BLOCK_N
    if (mode != 0) & (j0 < seg_len):
        block = tl.load(TABLES + seg.to(tl.int64) * stride_tn + block_idx).to(tl.int64)
        offs_b = tl.arange(0, BLOCK_N)
        n_ok = (j0 + offs_b) < seg_len
        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < GROUP
        rows = seg.to(tl.int64) * GROUP + offs_g
        ok = g_ok[:, None] & n_ok[None, :]
        s = tl.load(LOGITS + rows[:, None] * max_len + (j0 + offs_b)[None, :], mask=ok, other=float("-inf"))
        lse2 = tl.load(LSE2 + rows, mask=g_ok, other=0.0)
        lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)  # a row that saw no key: every p is 0
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        ptrs = MASS + block * BLOCK_N + offs_b
        old = tl.load(ptrs, mask=n_ok, other=0.0)
        new = tl.sum(p, 0) + tl.where(mode == 1, old, 0.0)
        tl.store(ptrs, new, mask=n_ok)


def _config(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(num_warps, num_stages)."""
    if dtype == torch.float32 or head_dim > 128:
        return 4, 2
    return 4, 3


def paged_decode_attention(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, tables: Tensor, lengths: Tensor, scale: float, *,
    mass_pool: Tensor | None = None, mass_mode: Tensor | None = None, pos_pool: Tensor | None = None,
    q_pos: Tensor | None = None, sliding_window: int | None = None, max_len: int | None = None,
    chunk: int | None = None, tile_blocks: int = 1,
) -> Tensor:
    """See reference.paged_decode_attention. The key tile is `tile_blocks` (1, 2 or 4) of the pool's blocks
    (the block size a power of two >= 16): one block needs one table read per tile, several give each
    step more keys. `chunk` forces the keys per split program (rounded up to whole tiles)."""
    N, G, d = q.shape
    B = k_pool.shape[1]
    if B < 16 or B & (B - 1):
        raise ValueError(f"the Triton paged kernel needs a power-of-two block size >= 16, got {B}")
    if tile_blocks not in (1, 2, 4):
        raise ValueError(f"tile_blocks must be 1, 2 or 4, got {tile_blocks}")
    if max_len is None:
        max_len = tables.shape[1] * B
    max_len = max(1, int(max_len))
    out = torch.empty_like(q)
    if N == 0:
        return out
    q = q.contiguous()
    k_pool = k_pool.to(q.dtype).contiguous()
    v_pool = v_pool.to(q.dtype).contiguous()
    tables = tables.to(torch.int32).contiguous()
    lengths = lengths.to(torch.int32).contiguous()
    if chunk is None:
        want_splits = max(1, TARGET_PROGRAMS // max(1, N))
        chunk = triton.cdiv(max_len, want_splits)
    tile = B * tile_blocks
    chunk = max(tile, triton.cdiv(chunk, tile) * tile)
    num_splits = max(1, triton.cdiv(max_len, chunk))
    block_d = max(16, triton.next_power_of_2(d))
    block_g = max(16, triton.next_power_of_2(G))
    dev = q.device
    rows = N * G
    m_part = torch.empty((rows, num_splits), dtype=torch.float32, device=dev)
    l_part = torch.empty((rows, num_splits), dtype=torch.float32, device=dev)
    acc_part = torch.empty((rows, num_splits, block_d), dtype=torch.float32, device=dev)
    want_mass = mass_pool is not None and mass_mode is not None
    logits = torch.empty((rows, max_len), dtype=torch.float32, device=dev) if want_mass else m_part
    lse2 = torch.empty((rows,), dtype=torch.float32, device=dev)
    sliding = sliding_window is not None
    pos = pos_pool.contiguous() if sliding else lengths
    qp = q_pos.to(dev, torch.int64).contiguous() if sliding else lengths
    warps, stages = _config(d, q.dtype)
    _paged_split_kernel[(num_splits, N)](
        q, k_pool, v_pool, pos, tables, lengths, qp, m_part, l_part, acc_part, logits,
        q.stride(0), q.stride(1), tables.stride(0), scale * LOG2E, chunk, num_splits, max_len,
        int(sliding_window or 0),
        GROUP=G, BLOCK_G=block_g, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=B, TILE_BLOCKS=tile_blocks,
        STORE_LOGITS=want_mass,
        SLIDING=sliding, PRECISION=dot_precision(q.dtype), num_warps=warps, num_stages=stages,
    )
    out2 = out.view(rows, d)
    _decode_combine_kernel[(rows,)](
        m_part, l_part, acc_part, out2, lse2, out2.stride(0), num_splits,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=COMBINE_BLOCK, num_warps=4,
    )
    if want_mass:
        _paged_mass_kernel[(triton.cdiv(max_len, B), N)](
            logits, lse2, tables, lengths, mass_mode.to(dev, torch.int32).contiguous(), mass_pool,
            tables.stride(0), max_len, GROUP=G, BLOCK_G=triton.next_power_of_2(G), BLOCK_N=B, num_warps=4,
        )
    return out

"""Ragged decode attention in Triton: one query token per head over the per-kv-head cache segments.

Twin of reference.decode_attention. Each kv head's segment has its own length (read on the device), and
the G query heads of a group share one pass over it: a program loads a K/V tile once and computes all G
rows with one tl.dot (rows padded to 16). Long segments are split: program (split, kv head) covers
`chunk` keys and writes a partial (max, sum-exp, unnormalised output); a combine kernel merges the
splits per query head. The grid depends only on max_len (a host int upper bound), never on the lengths,
and nothing syncs with the host, so the whole call can be captured in a CUDA graph with lengths in
static device buffers; shorter segments just mask (their surplus split programs write empty partials).

key_mass: the split pass also stores each head's scaled logits in a [H, max_len] float32 scratch; after the
combine has produced every head's final log-sum-exp, a light third kernel turns them into probabilities
and adds their sum over the group to key_mass. Reading G*4 bytes of logits per key is cheaper than
re-reading the key itself (2*d bytes) for every group size kvx meets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvx.kernels.triton_attention import LOG2E, dot_precision

# Partials a combine program merges per step.
COMBINE_BLOCK = 16
# Aim for about this many split programs in all (about two per SM on an H100); more only adds combine work
# (measured: 1k-key chunks beat 512 and 256 at 32k tokens per kv head).
TARGET_PROGRAMS = 256


@triton.jit
def _decode_split_kernel(
    Q, K, V, POS, Q_POS, SEG_START, SEG_LEN, M_PART, L_PART, ACC_PART, LOGITS,
    stride_qh, stride_ks, stride_vs, qk_scale, chunk, num_splits, max_len, window,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, STORE_LOGITS: tl.constexpr, SLIDING: tl.constexpr, PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    g = tl.program_id(1)
    seg_start = tl.load(SEG_START + g).to(tl.int64)
    seg_len = tl.load(SEG_LEN + g)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seg_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = g * GROUP + offs_g
    q = tl.load(Q + heads[:, None].to(tl.int64) * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if SLIDING:
        q_pos = tl.load(Q_POS)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        slots = seg_start + offs_n
        if SLIDING:  # keys at q_pos - window or earlier are hidden (their logits -inf, their mass 0)
            k_pos = tl.load(POS + slots, mask=n_ok, other=0)
            n_ok = n_ok & ((q_pos - k_pos) < window)
        kt = tl.load(K + slots[None, :] * stride_ks + offs_d[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        if STORE_LOGITS:  # every key of the segment, a hidden one as -inf (the mass kernel reads them all)
            tl.store(LOGITS + heads[:, None].to(tl.int64) * max_len + offs_n[None, :], s,
                     mask=g_ok[:, None] & (offs_n < hi)[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slots[:, None] * stride_vs + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new

    part = heads.to(tl.int64) * num_splits + split
    tl.store(M_PART + part, m_i, mask=g_ok)
    tl.store(L_PART + part, l_i, mask=g_ok)
    tl.store(ACC_PART + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def _decode_combine_kernel(
    M_PART, L_PART, ACC_PART, OUT, LSE2, stride_oh, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    h = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    base = h.to(tl.int64) * num_splits
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < num_splits
        m = tl.load(M_PART + base + offs_s, mask=s_ok, other=float("-inf"))
        l = tl.load(L_PART + base + offs_s, mask=s_ok, other=0.0)
        a = tl.load(ACC_PART + (base + offs_s)[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_shift)
        w = tl.exp2(m - m_shift)  # 0 for empty splits (m = -inf)
        l_run = l_run * alpha + tl.sum(l * w, 0)
        acc = acc * alpha + tl.sum(a * w[:, None], 0)
        m_run = m_new
    l_div = tl.where(l_run == 0.0, 1.0, l_run)  # an empty segment gives zeros
    out = acc / l_div
    tl.store(OUT + h.to(tl.int64) * stride_oh + offs_d, out.to(OUT.dtype.element_ty), mask=offs_d < HEAD_DIM)
    lse2 = tl.where(l_run == 0.0, float("-inf"), m_run + tl.log2(l_div))
    tl.store(LSE2 + h + tl.arange(0, 1), lse2)


@triton.jit
def _key_mass_kernel(
    LOGITS, LSE2, SEG_START, SEG_LEN, KEY_MASS, max_len,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tile = tl.program_id(0)
    g = tl.program_id(1)
    seg_start = tl.load(SEG_START + g).to(tl.int64)
    seg_len = tl.load(SEG_LEN + g)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < seg_len
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < GROUP
    heads = g * GROUP + offs_g
    ok = g_ok[:, None] & n_ok[None, :]
    s = tl.load(LOGITS + heads[:, None].to(tl.int64) * max_len + offs_n[None, :], mask=ok, other=0.0)
    lse2 = tl.load(LSE2 + heads, mask=g_ok, other=0.0)
    lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)  # a head that saw no key (all hidden): every p is 0
    p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
    mass_ptrs = KEY_MASS + seg_start + offs_n
    mass = tl.load(mass_ptrs, mask=n_ok, other=0.0)
    tl.store(mass_ptrs, mass + tl.sum(p, 0), mask=n_ok)


def split_plan(max_len: int, num_kv_heads: int, block_n: int, chunk: int | None = None) -> tuple[int, int]:
    """(chunk, num_splits): keys per split program (a multiple of block_n) and splits per kv head."""
    if chunk is None:
        want_splits = max(1, TARGET_PROGRAMS // max(1, num_kv_heads))
        chunk = triton.cdiv(max(1, max_len), want_splits)
    chunk = max(block_n, triton.cdiv(chunk, block_n) * block_n)
    return chunk, max(1, triton.cdiv(max_len, chunk))


def _decode_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages)."""
    if dtype == torch.float32 or head_dim > 128:
        return 32, 4, 2
    return 64, 8, 3


def decode_attention(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    seg_start: Tensor,
    seg_len: Tensor,
    scale: float,
    key_mass: Tensor | None = None,
    max_len: int | None = None,
    *,
    pos_pool: Tensor | None = None,
    q_pos: Tensor | None = None,
    sliding_window: int | None = None,
    chunk: int | None = None,
    blocks: tuple[int, int, int] | None = None,
) -> Tensor:
    """One query token per head over the ragged cache. q: [H, d] -> out [H, d] (q's dtype).

    k_pool, v_pool: [slots, d]; seg_start, seg_len: [Hkv] int32 on the device. max_len: a host upper bound
    on every seg_len (keys past it are ignored); pass the largest segment capacity. It defaults to the pool
    size, always safe but then most split programs find nothing to do.
    key_mass [slots] float32, when given, gets each key's probability summed over its group added to it.
    sliding_window, with pos_pool [slots] and q_pos [1] (on the device): keys at q_pos - window or earlier
    are hidden. `chunk` forces the keys per split program; `blocks` overrides (BLOCK_N, warps, stages).
    """
    H, d = q.shape
    Hkv = seg_start.shape[0]
    if H % Hkv:
        raise ValueError(f"{H} query heads cannot share {Hkv} kv heads")
    group = H // Hkv
    if max_len is None:
        max_len = k_pool.shape[0]
    max_len = max(1, int(max_len))
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_pool = k_pool.to(q.dtype)
    v_pool = v_pool.to(q.dtype)
    block_n, warps, stages = blocks or _decode_config(d, q.dtype)
    chunk, num_splits = split_plan(max_len, Hkv, block_n, chunk)
    block_d = max(16, triton.next_power_of_2(d))
    block_g = max(16, triton.next_power_of_2(group))
    dev = q.device
    m_part = torch.empty((H, num_splits), dtype=torch.float32, device=dev)
    l_part = torch.empty((H, num_splits), dtype=torch.float32, device=dev)
    acc_part = torch.empty((H, num_splits, block_d), dtype=torch.float32, device=dev)
    logits = torch.empty((H, max_len), dtype=torch.float32, device=dev) if key_mass is not None else m_part
    out = torch.empty((H, d), dtype=q.dtype, device=dev)
    lse2 = torch.empty((H,), dtype=torch.float32, device=dev)

    sliding = sliding_window is not None
    pos = pos_pool if sliding else seg_len
    qp = q_pos.to(dev, torch.int64) if sliding else seg_len
    _decode_split_kernel[(num_splits, Hkv)](
        q, k_pool, v_pool, pos, qp, seg_start, seg_len, m_part, l_part, acc_part, logits,
        q.stride(0), k_pool.stride(0), v_pool.stride(0), scale * LOG2E, chunk, num_splits, max_len,
        int(sliding_window or 0),
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=block_n,
        STORE_LOGITS=key_mass is not None, SLIDING=sliding, PRECISION=dot_precision(q.dtype), num_warps=warps,
        num_stages=stages,
    )
    _decode_combine_kernel[(H,)](
        m_part, l_part, acc_part, out, lse2, out.stride(0), num_splits,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=COMBINE_BLOCK, num_warps=4,
    )
    if key_mass is not None:
        mass_block = 256
        _key_mass_kernel[(triton.cdiv(max_len, mass_block), Hkv)](
            logits, lse2, seg_start, seg_len, key_mass, max_len,
            GROUP=group, BLOCK_G=triton.next_power_of_2(group), BLOCK_N=mass_block, num_warps=4,
        )
    return out

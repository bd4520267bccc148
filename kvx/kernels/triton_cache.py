"""Ragged-cache writes in Triton: append new tokens to every segment, and gather kept entries on compaction.

Twins of reference.cache_append and reference.compact_gather. The append reads each segment's end from
the device (start + length), so it needs no host sync and can sit inside a captured decode step; the
length update is a separate in-place add after the kernel so no program can see a half-updated length.
The gather copies rows along a flat (src, dst) index list built on the device from the per-head keep
lists.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _append_kernel(
    K_POOL, V_POOL, POS_POOL, SEG_START, SEG_LEN, K_NEW, V_NEW, POSITIONS,
    stride_kp, stride_vp, stride_knh, stride_knt, stride_vnh, stride_vnt, T,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    g = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    ok = t_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    end = tl.load(SEG_START + g).to(tl.int64) + tl.load(SEG_LEN + g).to(tl.int64)
    slots = end + offs_t
    rows_t = offs_t[:, None].to(tl.int64)
    k = tl.load(K_NEW + g.to(tl.int64) * stride_knh + rows_t * stride_knt + offs_d[None, :], mask=ok)
    v = tl.load(V_NEW + g.to(tl.int64) * stride_vnh + rows_t * stride_vnt + offs_d[None, :], mask=ok)
    tl.store(K_POOL + slots[:, None] * stride_kp + offs_d[None, :], k.to(K_POOL.dtype.element_ty), mask=ok)
    tl.store(V_POOL + slots[:, None] * stride_vp + offs_d[None, :], v.to(V_POOL.dtype.element_ty), mask=ok)
    pos = tl.load(POSITIONS + offs_t, mask=t_ok)
    tl.store(POS_POOL + slots, pos.to(POS_POOL.dtype.element_ty), mask=t_ok)


@triton.jit
def _gather_rows_kernel(
    SRC_POOL, DST_POOL, SRC, DST, rows, width,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < rows
    src = tl.load(SRC + offs_r, mask=r_ok, other=0)
    dst = tl.load(DST + offs_r, mask=r_ok, other=0)
    for w0 in range(0, width, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        ok = r_ok[:, None] & (offs_w < width)[None, :]
        x = tl.load(SRC_POOL + src[:, None] * width + offs_w[None, :], mask=ok)
        tl.store(DST_POOL + dst[:, None] * width + offs_w[None, :], x, mask=ok)


def cache_append(
    k_pool: Tensor,
    v_pool: Tensor,
    pos_pool: Tensor,
    seg_start: Tensor,
    seg_len: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    positions: Tensor,
) -> None:
    """Append T new tokens to every kv head's segment, in place; advances seg_len by T.

    k_new, v_new: [Hkv, T, d] (any strides with unit stride on d); positions: [T]. The caller guarantees
    capacity. No host sync: safe to capture in a CUDA graph with seg_start/seg_len in static buffers.
    """
    Hkv, T, d = k_new.shape
    if T == 0:
        return
    k_new = k_new if k_new.stride(-1) == 1 else k_new.contiguous()
    v_new = v_new if v_new.stride(-1) == 1 else v_new.contiguous()
    block_d = triton.next_power_of_2(d)
    block_t = max(1, min(64, 4096 // block_d))
    _append_kernel[(triton.cdiv(T, block_t), Hkv)](
        k_pool, v_pool, pos_pool, seg_start, seg_len, k_new, v_new, positions.contiguous(),
        k_pool.stride(0), v_pool.stride(0), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), T,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_T=block_t, num_warps=4,
    )
    seg_len += T


def gather_index(seg_start: Tensor, keep: list[Tensor], new_start: Tensor) -> tuple[Tensor, Tensor]:
    """Flat int64 (src, dst) slot lists: keep[g][i] of segment g lands at new_start[g] + i."""
    device = seg_start.device
    counts = [int(idx.numel()) for idx in keep]
    total = sum(counts)
    head = torch.repeat_interleave(torch.arange(len(keep)), torch.tensor(counts, dtype=torch.long))
    first = torch.tensor([0] + counts[:-1], dtype=torch.long).cumsum(0)
    rank = torch.arange(total) - first[head]  # index of each kept entry within its head
    head = head.to(device)
    idx = torch.cat([i.to(device=device, dtype=torch.long).reshape(-1) for i in keep])
    src = idx + seg_start.to(torch.long)[head]
    dst = rank.to(device) + new_start.to(device=device, dtype=torch.long)[head]
    return src, dst


def compact_gather(pool: Tensor, seg_start: Tensor, keep: list[Tensor], new_start: Tensor, new_slots: int) -> Tensor:
    """Gather the kept entries of every segment into a fresh pool of new_slots rows (zeros elsewhere).

    keep[g]: sorted indices within segment g; they land at new_start[g] + arange(len(keep[g])).
    Works for pools of any trailing shape ([slots, d], [slots]).
    """
    out = pool.new_zeros((new_slots, *pool.shape[1:]))
    if sum(int(idx.numel()) for idx in keep) == 0:
        return out
    src, dst = gather_index(seg_start, keep, new_start)
    width = math.prod(pool.shape[1:])
    block_w = min(256, triton.next_power_of_2(max(1, width)))
    block_r = max(1, 4096 // block_w)
    _gather_rows_kernel[(triton.cdiv(src.numel(), block_r),)](
        pool.contiguous(), out, src, dst, src.numel(), width, BLOCK_R=block_r, BLOCK_W=block_w, num_warps=4,
    )
    return out

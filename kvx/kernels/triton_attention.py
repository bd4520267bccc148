"""Prefill attention in Triton: flash-style tiles, causal by position, GQA, optional sliding window.

Twin of reference.attention (same signature and semantics). One program owns BLOCK_M query rows of one
query head and streams the keys of its kv head in BLOCK_N tiles with an online softmax (base 2, fp32
state), so no [T, S] matrix ever exists. Visibility comes from the positions loaded in the kernel, so
queries need not be the last keys. When positions are sorted (always the case in kvx: the cache keeps
position order) the host precomputes, per query tile, the key range that can be visible at all and the
sub-range visible to every row of the tile: tiles outside the first are skipped and tiles inside the
second run without a mask. For unsorted positions the range falls back to everything, masked.
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)
# Stand-in position for padding rows/keys: far enough that nothing padded is ever visible, near enough
# that position differences stay inside int32 (kernels compare positions as int32: 64-bit integer math is
# emulated on GPUs).
FAR = 1 << 29
_FAR = tl.constexpr(FAR)


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, q_pos, K_HEAD, V_HEAD, KPOS, start, hi, stride_ks, stride_vs, qk_scale, window,
    offs_d, d_ok,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_n = start + tl.arange(0, BLOCK_N)
    k_ptrs = K_HEAD + offs_n[None, :].to(tl.int64) * stride_ks + offs_d[:, None]
    v_ptrs = V_HEAD + offs_n[:, None].to(tl.int64) * stride_vs + offs_d[None, :]
    if MASKED:
        n_ok = offs_n < hi
        kt = tl.load(k_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        k_pos = tl.load(KPOS + offs_n, mask=n_ok, other=_FAR)
    elif BLOCK_D != HEAD_DIM:
        kt = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    else:
        kt = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
    if MASKED:
        diff = q_pos[:, None] - k_pos[None, :]
        visible = diff >= 0
        if HAS_WINDOW:
            visible = visible & (diff < window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet keeps m = -inf; shift by 0 instead so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    Q, K, V, QPOS, KPOS, RANGES, OUT, LSE,
    stride_qh, stride_qt, stride_kh, stride_ks, stride_vh, stride_vs, stride_oh, stride_ot,
    T, qk_scale, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, NEED_LSE: tl.constexpr, PRECISION: tl.constexpr,
):
    h = tl.program_id(0)
    # Late query tiles see the most keys: start them first so the tail of the grid is short work.
    m_tile = tl.num_programs(1) - 1 - tl.program_id(1)
    g = h // GROUP
    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = tl.load(QPOS + offs_m, mask=row_ok, other=-_FAR)

    lo = tl.load(RANGES + m_tile * 4)
    full_lo = tl.load(RANGES + m_tile * 4 + 1)
    full_hi = tl.load(RANGES + m_tile * 4 + 2)
    hi = tl.load(RANGES + m_tile * 4 + 3)

    K_HEAD = K + g.to(tl.int64) * stride_kh
    V_HEAD = V + g.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Masked tiles up to the start of the range every row sees (the sliding window's lower edge) ...
    n_head = tl.cdiv(full_lo - lo, BLOCK_N)
    for i in range(0, n_head):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, K_HEAD, V_HEAD, KPOS, lo + i * BLOCK_N, hi, stride_ks, stride_vs,
            qk_scale, window, offs_d, d_ok, BLOCK_N, HEAD_DIM, BLOCK_D, True, HAS_WINDOW, PRECISION)
    # ... whole tiles that every row sees, without a mask ...
    cursor = lo + n_head * BLOCK_N
    n_full = tl.maximum(full_hi - cursor, 0) // BLOCK_N
    for i in range(0, n_full):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, K_HEAD, V_HEAD, KPOS, cursor + i * BLOCK_N, hi, stride_ks, stride_vs,
            qk_scale, window, offs_d, d_ok, BLOCK_N, HEAD_DIM, BLOCK_D, False, HAS_WINDOW, PRECISION)
    # ... and the masked rest (the causal diagonal).
    cursor = cursor + n_full * BLOCK_N
    n_tail = tl.cdiv(tl.maximum(hi - cursor, 0), BLOCK_N)
    for i in range(0, n_tail):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, K_HEAD, V_HEAD, KPOS, cursor + i * BLOCK_N, hi, stride_ks, stride_vs,
            qk_scale, window, offs_d, d_ok, BLOCK_N, HEAD_DIM, BLOCK_D, True, HAS_WINDOW, PRECISION)

    l_div = tl.where(l_i == 0.0, 1.0, l_i)  # a row that sees no key returns zeros
    out = acc / l_div[:, None]
    o_ptrs = OUT + h.to(tl.int64) * stride_oh + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if NEED_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_div)) * _LN2)  # -inf: the row sees no key
        tl.store(LSE + h.to(tl.int64) * T + offs_m, lse, mask=row_ok)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (tf32 would miss the reference by ~1e-3); halves are exact anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _tile_bounds(pos: Tensor, block: int, count: int) -> tuple[Tensor, Tensor]:
    """Per tile of `block` consecutive entries: (min, max) position over the real entries."""
    tiles = triton.cdiv(count, block)
    pad = tiles * block - count
    lo = torch.nn.functional.pad(pos, (0, pad), value=FAR).view(tiles, block).amin(1)
    hi = torch.nn.functional.pad(pos, (0, pad), value=-FAR).view(tiles, block).amax(1)
    return lo, hi


def is_sorted(pos: Tensor) -> Tensor:
    """0-d bool tensor on pos's device (no host sync)."""
    if pos.numel() < 2:
        return torch.ones((), dtype=torch.bool, device=pos.device)
    return (pos[1:] >= pos[:-1]).all()


def key_ranges(q_pos: Tensor, k_pos: Tensor, block_m: int, sliding_window: int | None) -> Tensor:
    """[tiles, 4] int32 per query tile: lo, full_lo, full_hi, hi (key indices).

    Keys outside [lo, hi) are invisible to the whole tile; keys in [full_lo, full_hi) are visible to every
    row of it. Exact for sorted k_pos; otherwise (checked on the device, no sync) the whole range, masked.
    """
    T, S = q_pos.shape[0], k_pos.shape[0]
    qp, kp = q_pos.long(), k_pos.long().contiguous()
    q_min, q_max = _tile_bounds(qp, block_m, T)
    hi = torch.searchsorted(kp, q_max, right=True)
    full_hi = torch.searchsorted(kp, q_min, right=True)
    if sliding_window is None:
        lo = torch.zeros_like(hi)
        full_lo = torch.zeros_like(hi)
    else:
        lo = torch.searchsorted(kp, q_min - sliding_window + 1)
        full_lo = torch.searchsorted(kp, q_max - sliding_window + 1)
    full_hi = torch.maximum(full_hi, full_lo)
    exact = torch.stack([lo, full_lo, full_hi, hi], dim=1)
    fallback = torch.zeros_like(exact)  # built on the device: a host tensor copied over would sync
    fallback[:, 3] = S
    return torch.where(is_sorted(kp), exact, fallback).to(torch.int32).contiguous()


def positions32(pos: Tensor) -> Tensor:
    """Positions as contiguous int32 for the kernels."""
    return pos.to(torch.int32).contiguous()


def shared_memory_limit(device: torch.device) -> int | None:
    """Shared memory one program may use on `device`'s GPU (bytes), as Triton checks it at launch; None
    under the interpreter, where there is no chip."""
    if not isinstance(_prefill_kernel, triton.runtime.JITFunction):
        return None
    from triton.runtime import driver

    index = device.index if device.type == "cuda" and device.index is not None else driver.active.get_current_device()
    return _max_shared_mem(index)


@cache
def _max_shared_mem(device_index: int) -> int:
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(device_index)["max_shared_mem"])


def _prefill_shared_bytes(block_m: int, block_n: int, block_d: int, stages: int, elem: int) -> int:
    """Upper estimate of the prefill tile's shared memory: the Q tile plus `stages` buffered K and V tiles."""
    return (block_m * block_d + 2 * stages * block_n * block_d) * elem + 1024


def _prefill_config(head_dim: int, dtype: torch.dtype, shared_limit: int | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by head size and element size, shrunk (fewer pipeline
    stages first, then shorter query tiles) to fit `shared_limit`: the bf16 tile for head size 128 needs
    129 KiB, which a Hopper or an A100 has and an RTX 3090/4090, an A10 or an L4 (99 KiB) has not."""
    if dtype == torch.float32:
        block_m, block_n, warps, stages = (64, 32, 4, 2) if head_dim <= 128 else (32, 32, 4, 1)
    elif head_dim <= 64:
        block_m, block_n, warps, stages = 128, 64, 4, 3
    elif head_dim <= 128:
        block_m, block_n, warps, stages = 128, 64, 8, 3
    else:
        block_m, block_n, warps, stages = 64, 32, 4, 2
    if shared_limit is not None:
        block_d, elem = max(16, triton.next_power_of_2(head_dim)), torch.finfo(dtype).bits // 8
        while stages > 1 and _prefill_shared_bytes(block_m, block_n, block_d, stages, elem) > shared_limit:
            stages -= 1
        while block_m > 16 and _prefill_shared_bytes(block_m, block_n, block_d, stages, elem) > shared_limit:
            block_m //= 2
    return block_m, block_n, warps, stages


def _rows_last_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    scale: float,
    sliding_window: int | None = None,
    need_lse: bool = False,
    *,
    blocks: tuple[int, int, int, int] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Causal GQA attention by position. Returns (out [H, T, d], lse [H, T] float32 or None).

    q: [H, T, d]; k, v: [Hkv, S, d] (any strides with unit stride on d); q_pos [T], k_pos [S].
    lse is the natural-log log-sum-exp of each row's scaled logits over its visible keys (-inf, and a zero
    output row, for a row that sees none). `blocks` overrides (BLOCK_M, BLOCK_N, warps, stages).
    """
    H, T, d = q.shape
    Hkv, S, _ = k.shape
    if H % Hkv:
        raise ValueError(f"{H} query heads cannot share {Hkv} kv heads")
    q = _rows_last_contiguous(q)
    k = _rows_last_contiguous(k.to(q.dtype))
    v = _rows_last_contiguous(v.to(q.dtype))
    out = torch.empty((H, T, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, T), dtype=torch.float32, device=q.device) if need_lse else None
    if T == 0:
        return out, lse
    if S == 0:
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return out, lse
    block_m, block_n, warps, stages = blocks or _prefill_config(d, q.dtype, shared_memory_limit(q.device))
    ranges = key_ranges(q_pos, k_pos, block_m, sliding_window)
    grid = (H, triton.cdiv(T, block_m))
    _prefill_kernel[grid](
        q, k, v, positions32(q_pos), positions32(k_pos), ranges, out, lse if lse is not None else out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        T, scale * LOG2E, int(sliding_window or 0),
        GROUP=H // Hkv, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, NEED_LSE=need_lse, PRECISION=dot_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    return out, lse

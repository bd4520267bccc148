"""Window statistics in Triton: column sums of attention probabilities over a few query rows.

The prefill kernel stores each row's log-sum-exp; these kernels recompute q·k for the scoring rows,
normalise with that lse and reduce over the rows inside one program per (query head, key tile), so the
[rows, S] probability matrix never exists and no atomics are needed (POLICIES.md section 6, items 2, 3, 5).

window_stats: col_sum (and col_sq) over the rows given, at the model's scale (SnapKV family, LaProx, TOVA
with one row, H2O's all-row column sums with every row).
sg_colsum: AhaKV's step-gain column sums. Each row has its own logit multiplier lambda_i (stats.sg_scales),
so it needs its own normaliser: a first sweep computes lse at lambda_i per row (online max/sum-exp over all
keys), the second is the column kernel with those multipliers and that lse.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvx.kernels.stats import sg_scales
from kvx.kernels.triton_attention import FAR, LOG2E, dot_precision, is_sorted, positions32

_FAR = tl.constexpr(FAR)
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(LOG2E)
# Programs the step-gain lse sweep aims for when it splits the keys.
SPLIT_TARGET_PROGRAMS = 1024


@triton.jit
def _column_stats_kernel(
    Q, K, QPOS, KPOS, ROW_MULT, LSE, ROW_RANGES, COL_SUM, COL_SQ,
    stride_qh, stride_qr, stride_kh, stride_ks, stride_lh, S, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, WANT_SQ: tl.constexpr, PRECISION: tl.constexpr,
):
    h = tl.program_id(0)
    n_tile = tl.program_id(1)
    g = h // GROUP
    offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < S
    d_ok = offs_d < HEAD_DIM
    k_ptrs = K + g.to(tl.int64) * stride_kh + offs_n[None, :].to(tl.int64) * stride_ks + offs_d[:, None]
    kt = tl.load(k_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
    k_pos = tl.load(KPOS + offs_n, mask=n_ok, other=_FAR)
    r_lo = tl.load(ROW_RANGES + n_tile * 2)
    r_hi = tl.load(ROW_RANGES + n_tile * 2 + 1)

    col_sum = tl.zeros([BLOCK_N], tl.float32)
    col_sq = tl.zeros([BLOCK_N], tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < r_hi
        q_ptrs = Q + h.to(tl.int64) * stride_qh + offs_r[:, None].to(tl.int64) * stride_qr + offs_d[None, :]
        q = tl.load(q_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        q_pos = tl.load(QPOS + offs_r, mask=r_ok, other=-_FAR)
        mult = tl.load(ROW_MULT + offs_r, mask=r_ok, other=0.0) * _LOG2E
        lse2 = tl.load(LSE + h.to(tl.int64) * stride_lh + offs_r, mask=r_ok, other=0.0) * _LOG2E
        s = tl.dot(q, kt, input_precision=PRECISION) * mult[:, None] - lse2[:, None]
        diff = q_pos[:, None] - k_pos[None, :]
        visible = diff >= 0
        if HAS_WINDOW:
            visible = visible & (diff < window)
        # A visible entry implies a finite lse, so only visible entries are exponentiated for real.
        p = tl.where(visible, tl.exp2(tl.where(visible, s, 0.0)), 0.0)
        col_sum += tl.sum(p, 0)
        if WANT_SQ:
            col_sq += tl.sum(p * p, 0)
    out_offs = h.to(tl.int64) * S + offs_n
    tl.store(COL_SUM + out_offs, col_sum, mask=n_ok)
    if WANT_SQ:
        tl.store(COL_SQ + out_offs, col_sq, mask=n_ok)


@triton.jit
def _row_lse_kernel(
    Q, K, QPOS, KPOS, ROW_MULT, PART,
    stride_qh, stride_qr, stride_kh, stride_ks, R, S, window, chunk, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):
    """Partial natural-log lse of BLOCK_R rows over one chunk of keys: PART[h, r, split]."""
    h = tl.program_id(0)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_r < R
    d_ok = offs_d < HEAD_DIM
    g = h // GROUP
    q_ptrs = Q + h.to(tl.int64) * stride_qh + offs_r[:, None].to(tl.int64) * stride_qr + offs_d[None, :]
    q = tl.load(q_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = tl.load(QPOS + offs_r, mask=r_ok, other=-_FAR)
    mult = tl.load(ROW_MULT + offs_r, mask=r_ok, other=0.0) * _LOG2E
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    K_HEAD = K + g.to(tl.int64) * stride_kh
    lo = split * chunk
    hi = tl.minimum(lo + chunk, S)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        kt = tl.load(K_HEAD + offs_n[None, :].to(tl.int64) * stride_ks + offs_d[:, None],
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        k_pos = tl.load(KPOS + offs_n, mask=n_ok, other=_FAR)
        s = tl.dot(q, kt, input_precision=PRECISION) * mult[:, None]
        diff = q_pos[:, None] - k_pos[None, :]
        visible = diff >= 0
        if HAS_WINDOW:
            visible = visible & (diff < window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_shift) + tl.sum(tl.exp2(s - m_shift[:, None]), 1)
        m_i = m_new
    l_div = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_div)) * _LN2)
    tl.store(PART + (h.to(tl.int64) * R + offs_r) * num_splits + split, lse, mask=r_ok)


def row_ranges(q_pos: Tensor, k_pos: Tensor, block_n: int, sliding_window: int | None) -> Tensor:
    """[key tiles, 2] int32: the rows [r_lo, r_hi) that can see some key of each tile.

    Exact for sorted q_pos (checked on the device, no sync); otherwise every row.
    """
    R, S = q_pos.shape[0], k_pos.shape[0]
    qp, kp = q_pos.long().contiguous(), k_pos.long()
    tiles = triton.cdiv(S, block_n)
    pad = tiles * block_n - S
    k_min = torch.nn.functional.pad(kp, (0, pad), value=FAR).view(tiles, block_n).amin(1)
    k_max = torch.nn.functional.pad(kp, (0, pad), value=-FAR).view(tiles, block_n).amax(1)
    r_lo = torch.searchsorted(qp, k_min)
    if sliding_window is None:
        r_hi = torch.full_like(r_lo, R)
    else:
        r_hi = torch.searchsorted(qp, k_max + sliding_window - 1, right=True)
    exact = torch.stack([r_lo, torch.maximum(r_hi, r_lo)], dim=1)
    fallback = torch.zeros_like(exact)  # built on the device: a host tensor copied over would sync
    fallback[:, 1] = R
    return torch.where(is_sorted(qp), exact, fallback).to(torch.int32).contiguous()


def _stats_config(rows: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_N, num_warps): rows per step sized to the window, at least 16 for tl.dot."""
    block_r = min(64, max(16, triton.next_power_of_2(rows)))
    if dtype == torch.float32:
        return min(block_r, 32), 64, 4
    return block_r, 128, 8 if block_r >= 64 else 4


def _prepare(q_rows: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    q_rows = q_rows if q_rows.stride(-1) == 1 else q_rows.contiguous()
    k = k.to(q_rows.dtype)
    return q_rows, (k if k.stride(-1) == 1 else k.contiguous())


def _column_stats(q_rows, k, q_pos, k_pos, row_mult, lse, sliding_window, want_sq, blocks):
    H, R, d = q_rows.shape
    Hkv, S, _ = k.shape
    col_sum = torch.zeros((H, S), dtype=torch.float32, device=q_rows.device)
    col_sq = torch.zeros((H, S), dtype=torch.float32, device=q_rows.device) if want_sq else None
    if R == 0 or S == 0:
        return col_sum, col_sq
    block_r, block_n, warps = blocks or _stats_config(R, q_rows.dtype)
    ranges = row_ranges(q_pos, k_pos, block_n, sliding_window)
    lse = lse if lse.dtype == torch.float32 and lse.stride(-1) == 1 else lse.float().contiguous()
    grid = (H, triton.cdiv(S, block_n))
    _column_stats_kernel[grid](
        q_rows, k, positions32(q_pos), positions32(k_pos), row_mult, lse, ranges, col_sum,
        col_sq if col_sq is not None else col_sum,
        q_rows.stride(0), q_rows.stride(1), k.stride(0), k.stride(1), lse.stride(0), S, int(sliding_window or 0),
        GROUP=H // Hkv, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_R=block_r, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, WANT_SQ=want_sq, PRECISION=dot_precision(q_rows.dtype),
        num_warps=warps,
    )
    return col_sum, col_sq


def window_stats(
    q_win: Tensor,
    k: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    lse_win: Tensor,
    scale: float,
    sliding_window: int | None,
    want_sq: bool,
    *,
    blocks: tuple[int, int, int] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Column sums (and sums of squares) of the attention probabilities of the rows q_win.

    q_win: [H, w, d] at positions q_pos [w]; k: [Hkv, S, d] at k_pos [S]; lse_win: [H, w] natural-log
    row log-sum-exp at `scale` (from attention(..., need_lse=True)). Returns (col_sum [H, S] float32,
    col_sq [H, S] float32 or None). A row that sees no key contributes nothing.
    """
    q_win, k = _prepare(q_win, k)
    row_mult = torch.full((q_win.shape[1],), scale, dtype=torch.float32, device=q_win.device)
    return _column_stats(q_win, k, q_pos, k_pos, row_mult, lse_win, sliding_window, want_sq, blocks)


def sg_colsum(
    q_rows: Tensor,
    k: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    sg_budget: int,
    scale: float,
    sliding_window: int | None,
    *,
    blocks: tuple[int, int, int] | None = None,
) -> Tensor:
    """AhaKV step-gain column sums [H, S] float32 over the rows q_rows [H, r, d] at positions q_pos [r].

    Row i uses logits lambda_i * q_i·k_j with lambda_i = stats.sg_scales(q_pos, sg_budget, d, scale) and
    its own softmax normaliser at that scale (first sweep), then the probabilities are summed per key.
    """
    q_rows, k = _prepare(q_rows, k)
    H, R, d = q_rows.shape
    Hkv, S, _ = k.shape
    lam = sg_scales(q_pos, sg_budget, d, scale).to(q_rows.device).contiguous()
    lse = torch.full((H, R), float("-inf"), dtype=torch.float32, device=q_rows.device)
    if R and S:
        block_r, block_n, warps = blocks or _stats_config(R, q_rows.dtype)
        block_n = min(block_n, 64)
        # The few scoring rows alone give too few programs for a GPU: split the keys too, and merge the
        # partial lse of the splits with one logsumexp.
        row_tiles = triton.cdiv(R, block_r)
        splits = max(1, min(triton.cdiv(S, block_n), SPLIT_TARGET_PROGRAMS // (H * row_tiles)))
        chunk = triton.cdiv(triton.cdiv(S, splits), block_n) * block_n
        splits = triton.cdiv(S, chunk)
        part = torch.empty((H, R, splits), dtype=torch.float32, device=q_rows.device)
        _row_lse_kernel[(H, row_tiles, splits)](
            q_rows, k, positions32(q_pos), positions32(k_pos), lam, part,
            q_rows.stride(0), q_rows.stride(1), k.stride(0), k.stride(1), R, S, int(sliding_window or 0),
            chunk, splits,
            GROUP=H // Hkv, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_R=block_r,
            BLOCK_N=block_n, HAS_WINDOW=sliding_window is not None, PRECISION=dot_precision(q_rows.dtype),
            num_warps=4,
        )
        lse = torch.logsumexp(part, dim=-1)
    col_sum, _ = _column_stats(q_rows, k, q_pos, k_pos, lam, lse, sliding_window, False, blocks)
    return col_sum


@triton.jit
def _column_max_kernel(
    Q, K, QPOS, KPOS, LSE, ROW_W, ROW_RANGES, COL_MAX,
    stride_qh, stride_qr, stride_kh, stride_ks, stride_lh, S, scale2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """KVzip: max over the rows of w_r * exp(q_r·k_j * scale - lse_r), one program per (head, key tile)."""
    h = tl.program_id(0)
    n_tile = tl.program_id(1)
    g = h // GROUP
    offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < S
    d_ok = offs_d < HEAD_DIM
    k_ptrs = K + g.to(tl.int64) * stride_kh + offs_n[None, :].to(tl.int64) * stride_ks + offs_d[:, None]
    kt = tl.load(k_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
    k_pos = tl.load(KPOS + offs_n, mask=n_ok, other=_FAR)
    r_lo = tl.load(ROW_RANGES + n_tile * 2)
    r_hi = tl.load(ROW_RANGES + n_tile * 2 + 1)
    col_max = tl.zeros([BLOCK_N], tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < r_hi
        q_ptrs = Q + h.to(tl.int64) * stride_qh + offs_r[:, None].to(tl.int64) * stride_qr + offs_d[None, :]
        q = tl.load(q_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        q_pos = tl.load(QPOS + offs_r, mask=r_ok, other=-_FAR)
        lse2 = tl.load(LSE + h.to(tl.int64) * stride_lh + offs_r, mask=r_ok, other=0.0) * _LOG2E
        w = tl.load(ROW_W + offs_r, mask=r_ok, other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale2 - lse2[:, None]
        visible = (q_pos[:, None] - k_pos[None, :]) >= 0
        p = tl.where(visible, tl.exp2(tl.where(visible, s, 0.0)), 0.0) * w[:, None]
        col_max = tl.maximum(col_max, tl.max(p, 0))
    tl.store(COL_MAX + h.to(tl.int64) * S + offs_n, col_max, mask=n_ok)


def column_max(
    q_rows: Tensor,
    k: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    lse: Tensor,
    scale: float,
    row_weight: Tensor | None = None,
    *,
    blocks: tuple[int, int, int] | None = None,
) -> Tensor:
    """[H, S] float32 max over the rows of (row_weight *) the attention probabilities (KVzip's col_max).

    q_rows: [H, R, d] at q_pos [R]; k: [Hkv, S, d] at k_pos [S]; lse: [H, R] natural-log row log-sum-exp
    over exactly these keys at `scale` (attention(..., need_lse=True)). Causal by position.
    """
    q_rows, k = _prepare(q_rows, k)
    H, R, d = q_rows.shape
    Hkv, S, _ = k.shape
    out = torch.zeros((H, S), dtype=torch.float32, device=q_rows.device)
    if R == 0 or S == 0:
        return out
    block_r, block_n, warps = blocks or _stats_config(R, q_rows.dtype)
    ranges = row_ranges(q_pos, k_pos, block_n, None)
    lse = lse if lse.dtype == torch.float32 and lse.stride(-1) == 1 else lse.float().contiguous()
    w = (torch.ones(R, dtype=torch.float32, device=q_rows.device) if row_weight is None
         else row_weight.float().to(q_rows.device).contiguous())
    _column_max_kernel[(H, triton.cdiv(S, block_n))](
        q_rows, k, positions32(q_pos), positions32(k_pos), lse, w, ranges, out,
        q_rows.stride(0), q_rows.stride(1), k.stride(0), k.stride(1), lse.stride(0), S, scale * LOG2E,
        GROUP=H // Hkv, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_R=block_r,
        BLOCK_N=block_n, PRECISION=dot_precision(q_rows.dtype), num_warps=warps,
    )
    return out

"""The split-K combine of decode attention in Triton.

A long segment's keys are split over several programs, each writing a partial (running max, sum of
exponentials, unnormalised output) per query row; this kernel merges a row's partials into its output and
its log-sum-exp (base 2). The paged decode kernel (triton_paged.py) uses it.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Partials a combine program merges per step.
COMBINE_BLOCK = 16
# Aim for about this many split programs in all (about two per SM on an H100); more only adds combine work
# (measured with the earlier contiguous decode kernel: 1k-key chunks beat 512 and 256 at 32k tokens per kv
# head).
TARGET_PROGRAMS = 256


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

"""Kernel dispatch: Triton on CUDA tensors, the plain-PyTorch reference elsewhere.

KVX_KERNELS=reference|triton forces one side (read at every call). Forcing triton on CPU tensors only
works under TRITON_INTERPRET=1, set before the Triton modules are first imported. The Triton modules are
imported lazily, so the CPU path never pays for (or needs) Triton.

The reference twins of window_stats and sg_colsum live at the bottom of this file: reference.py has no
function with their signature (stats.compute_layer_stats forms its own lse).
"""

from __future__ import annotations

import dataclasses
import os
from functools import cache
from types import ModuleType

import torch
from torch import Tensor

from kvx.errors import KvxError
from kvx.kernels import cpu_native, reference
from kvx.kernels.reference import QUERY_CHUNK, visibility_mask
from kvx.kernels.stats import (
    LayerStats,
    StatsRequest,
    col_max_over_rows,
    compute_layer_stats,
    sg_scales,
    visible_row_counts,
)

BACKEND_ENV = "KVX_KERNELS"


@cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: Tensor) -> bool:
    """Whether a call on tensor x goes to the Triton kernels."""
    choice = os.environ.get(BACKEND_ENV, "").strip().lower()
    if choice in ("", "auto"):
        return x.is_cuda and _triton_available()
    if choice == "reference":
        return False
    if choice == "triton":
        if not _triton_available():
            raise KvxError(f"{BACKEND_ENV}=triton but Triton is not installed")
        return True
    raise KvxError(f"{BACKEND_ENV} must be 'reference' or 'triton', got {choice!r}")


def use_native(x: Tensor):
    """kvx's C library (kernels/cpu_native.py) when a call on tensor x goes to it (the CPU, KVX_KERNELS
    unset or auto, the library built), else None."""
    if x.device.type != "cpu" or os.environ.get(BACKEND_ENV, "").strip().lower() not in ("", "auto"):
        return None
    return cpu_native.library()


def appends_in_attention(device: torch.device) -> bool:
    """Whether paged_decode_attention writes a step's new entries in the same call (the C kernel) on
    `device`; elsewhere the caller writes them first (a captured GPU step keeps its own writes)."""
    return use_native(torch.empty(0, device=device)) is not None


def _module(name: str) -> ModuleType:
    import importlib

    return importlib.import_module(f"kvx.kernels.{name}")


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
    """Causal GQA attention by position: (out [H, T, d], lse [H, T] float32 or None). See reference.attention."""
    if use_triton(q):
        return _module("triton_attention").attention(q, k, v, q_pos, k_pos, scale, sliding_window, need_lse)
    return reference.attention(q, k, v, q_pos, k_pos, scale, sliding_window, need_lse)


def window_stats(
    q_win: Tensor,
    k: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    lse_win: Tensor,
    scale: float,
    sliding_window: int | None,
    want_sq: bool,
) -> tuple[Tensor, Tensor | None]:
    """(col_sum [H, S], col_sq [H, S] or None) float32 of the rows q_win [H, w, d] normalised by lse_win [H, w]."""
    if use_triton(q_win):
        return _module("triton_stats").window_stats(q_win, k, q_pos, k_pos, lse_win, scale, sliding_window, want_sq)
    return window_stats_reference(q_win, k, q_pos, k_pos, lse_win, scale, sliding_window, want_sq)


def sg_colsum(
    q_rows: Tensor,
    k: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    sg_budget: int,
    scale: float,
    sliding_window: int | None,
) -> Tensor:
    """AhaKV step-gain column sums [H, S] float32 over the rows q_rows [H, r, d]."""
    if use_triton(q_rows):
        return _module("triton_stats").sg_colsum(q_rows, k, q_pos, k_pos, sg_budget, scale, sliding_window)
    return sg_colsum_reference(q_rows, k, q_pos, k_pos, sg_budget, scale, sliding_window)


def column_max(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float,
               row_weight: Tensor | None = None) -> Tensor:
    """KVzip's col_max [H, S] float32: max over the rows q [H, T, d] of (row_weight *) their attention over
    exactly the keys k [Hkv, S, d] (causal by position). On CUDA: the rows' lse from the Triton attention,
    then triton_stats.column_max; elsewhere stats.col_max_over_rows."""
    if use_triton(q):
        _, lse = attention(q, k, k, q_pos, k_pos, scale, None, need_lse=True)
        return _module("triton_stats").column_max(q, k, q_pos, k_pos, lse, scale, row_weight)
    return col_max_over_rows(q, k, q_pos, k_pos, scale, row_weight)


def reconstruction_attention(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, ctx_pos: Tensor, k_own: Tensor,
                             v_own: Tensor, own_pos: Tensor, sinks: int, start: int, end: int, scale: float,
                             row_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A KVzip reconstruction pass's attention (q [H, T, d] at own_pos over the context k_ctx, v_ctx
    [Hkv, n, d] at ctx_pos and its own k_own, v_own) and its col_max [H, sinks + end - start] over the sinks
    [0, sinks) and the chunk [start, end) (kernels/reconstruction.py). On CUDA: the Triton attention, then
    column_max over the subset; elsewhere the fused CPU sweep (one subset softmax for both)."""
    from kvx.kernels import reconstruction

    if use_triton(q):
        k, v = torch.cat([k_ctx, k_own], dim=1), torch.cat([v_ctx, v_own], dim=1)
        return reconstruction.reconstruction_attention_plain(q, k, v, own_pos, torch.cat([ctx_pos, own_pos]),
                                                             sinks, start, end, scale, row_weight)
    return reconstruction.reconstruction_attention(q, k_ctx, v_ctx, k_own, v_own, sinks, start, end, scale,
                                                   row_weight)


def layer_stats(
    req: StatsRequest,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    scale: float,
    sliding_window: int | None = None,
    q_pre_rope: Tensor | None = None,
    o_proj_weight: Tensor | None = None,
    gram: Tensor | None = None,
) -> LayerStats:
    """stats.compute_layer_stats, with the attention-side statistics from the Triton kernels on CUDA.

    compute_layer_stats stays the plain-PyTorch oracle (the kernel tests compare against it, on CUDA too);
    this is what the engine calls. The token-side statistics (norms, moments) are cheap elementwise work
    and always come from compute_layer_stats.
    """
    if not (req.needs_attention and use_triton(q)):
        return compute_layer_stats(req, q, k, v, q_pos, k_pos, scale, sliding_window, q_pre_rope,
                                   o_proj_weight, gram)
    token_side = dataclasses.replace(req, window=0, window_sq=False, last_row=False, colsum_all=False,
                                     sg_rows=0, sg_budget=0)
    stats = compute_layer_stats(token_side, q, k, v, q_pos, k_pos, scale, sliding_window, q_pre_rope,
                                o_proj_weight, gram)
    T = q.shape[1]
    if T == 0:
        raise ValueError("attention statistics need at least one query row")
    window = min(req.window, T)
    stats.window = window
    # The rows whose softmax normaliser we need: every row for H2O, else the window (or the last row).
    # This reruns the attention over those rows (for H2O a second full pass; the window is a few rows).
    rows = T if req.colsum_all else max(window, 1 if req.last_row else 0)
    lse = None
    if rows:
        _, lse = attention(q[:, T - rows:], k, v, q_pos[T - rows:], k_pos, scale, sliding_window, need_lse=True)
    if req.colsum_all:
        stats.colsum_all, _ = window_stats(q, k, q_pos, k_pos, lse, scale, sliding_window, False)
        stats.colsum_count = visible_row_counts(q_pos, k_pos, sliding_window)
    if window:
        stats.col_sum, stats.col_sq = window_stats(q[:, T - window:], k, q_pos[T - window:], k_pos,
                                                   lse[:, rows - window:], scale, sliding_window, req.window_sq)
    if req.last_row:
        stats.last_row = _last_row_probs(q[:, -1], k, q_pos[-1:], k_pos, lse[:, -1], scale, sliding_window)
    if req.sg_rows:
        r = min(req.sg_rows, T)
        stats.col_sum_sg = sg_colsum(q[:, T - r:], k, q_pos[T - r:], k_pos, req.sg_budget, scale, sliding_window)
    return stats


def _last_row_probs(q_last, k, q_pos, k_pos, lse_last, scale, sliding_window) -> Tensor:
    """[H, S] float32 attention probabilities of one query row per head, given its log-sum-exp."""
    H, d = q_last.shape
    Hkv, S, _ = k.shape
    logits = torch.einsum("kgd,ksd->kgs", q_last.float().view(Hkv, H // Hkv, d), k.float()).reshape(H, S)
    probs = torch.exp(logits * scale - lse_last.float()[:, None])
    return torch.where(visibility_mask(q_pos, k_pos, sliding_window)[0], probs, torch.zeros_like(probs))


# --- plain-PyTorch twins of the statistics kernels -----------------------------------------------------------


def _column_sums(q_rows, k, q_pos, k_pos, row_mult, lse, sliding_window, want_sq):
    """Column sums (and squares) of exp(row_mult_i q_i·k_j - lse_i) over visible entries, chunked over rows."""
    H, R, d = q_rows.shape
    Hkv, S, _ = k.shape
    G = H // Hkv
    kt = k.float().transpose(-1, -2).unsqueeze(1)  # [Hkv, 1, d, S]
    col_sum = torch.zeros((Hkv, G, S), dtype=torch.float32, device=q_rows.device)
    col_sq = torch.zeros_like(col_sum) if want_sq else None
    qg = q_rows.reshape(Hkv, G, R, d).float()
    lse = lse.reshape(Hkv, G, R).float()
    for r0 in range(0, R, QUERY_CHUNK):
        r1 = min(R, r0 + QUERY_CHUNK)
        logits = torch.matmul(qg[:, :, r0:r1], kt) * row_mult[r0:r1].view(1, 1, -1, 1)
        visible = visibility_mask(q_pos[r0:r1], k_pos, sliding_window)
        shifted = torch.where(visible, logits - lse[:, :, r0:r1, None], torch.zeros_like(logits))
        probs = torch.where(visible, torch.exp(shifted), torch.zeros_like(logits))
        col_sum += probs.sum(dim=2)
        if col_sq is not None:
            col_sq += probs.square().sum(dim=2)
    return col_sum.reshape(H, S), (col_sq.reshape(H, S) if col_sq is not None else None)


def window_stats_reference(q_win, k, q_pos, k_pos, lse_win, scale, sliding_window, want_sq):
    """Twin of triton_stats.window_stats."""
    row_mult = torch.full((q_win.shape[1],), scale, dtype=torch.float32, device=q_win.device)
    return _column_sums(q_win, k, q_pos, k_pos, row_mult, lse_win, sliding_window, want_sq)


def sg_colsum_reference(q_rows, k, q_pos, k_pos, sg_budget, scale, sliding_window):
    """Twin of triton_stats.sg_colsum: per-row lambda_i (stats.sg_scales), each row normalised at its lambda."""
    H, R, d = q_rows.shape
    Hkv, S, _ = k.shape
    G = H // Hkv
    lam = sg_scales(q_pos, sg_budget, d, scale).to(q_rows.device)
    qg = q_rows.reshape(Hkv, G, R, d).float()
    kt = k.float().transpose(-1, -2).unsqueeze(1)
    lse = torch.empty((Hkv, G, R), dtype=torch.float32, device=q_rows.device)
    for r0 in range(0, R, QUERY_CHUNK):
        r1 = min(R, r0 + QUERY_CHUNK)
        logits = torch.matmul(qg[:, :, r0:r1], kt) * lam[r0:r1].view(1, 1, -1, 1)
        visible = visibility_mask(q_pos[r0:r1], k_pos, sliding_window)
        lse[:, :, r0:r1] = torch.logsumexp(logits.masked_fill(~visible, float("-inf")), dim=-1)
    col_sum, _ = _column_sums(q_rows, k, q_pos, k_pos, lam, lse.reshape(H, R), sliding_window, False)
    return col_sum


def paged_decode_attention(q, k_pool, v_pool, tables, lengths, scale, *, mass_pool=None, mass_mode=None,
                           pos_pool=None, q_pos=None, sliding_window=None, max_len=None, row_starts=None,
                           new_entries=None):
    """Batched decode attention over paged segments; see reference.paged_decode_attention.

    max_len sizes the Triton grid: a host upper bound on every length (CUDA graphs need it fixed).
    row_starts: each segment's first pool slot when the caller knows its blocks are consecutive (the
    reference then reads slices without checking the tables; Triton reads the tables either way).
    new_entries: (k [N, d], v [N, d], positions [N]), the step's new token of every segment, written as its
    last entry (entry lengths - 1) before attending (reference.append_entries; the C kernel does it in the
    same call)."""
    kw = dict(mass_pool=mass_pool, mass_mode=mass_mode, pos_pool=pos_pool, q_pos=q_pos,
              sliding_window=sliding_window, max_len=max_len)
    lib = use_native(q)
    if lib is not None:  # kvx's C kernel (kernels/cpu_native.c); None: inputs it does not take
        kw.pop("max_len")
        out = cpu_native.paged_decode_attention(lib, q, k_pool, v_pool, tables, lengths, scale,
                                                new_entries=new_entries, **kw)
        if out is not None:
            return out
        kw["max_len"] = max_len
    if new_entries is not None:
        reference.append_entries(k_pool, v_pool, pos_pool, tables, lengths, *new_entries)
    if use_triton(q):
        return _module("triton_paged").paged_decode_attention(q, k_pool, v_pool, tables, lengths, scale, **kw)
    return reference.paged_decode_attention(q, k_pool, v_pool, tables, lengths, scale, row_starts=row_starts, **kw)

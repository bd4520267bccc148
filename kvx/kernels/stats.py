"""Statistics the attention emits for eviction policies (see POLICIES.md section 6).

A policy declares what it needs as a StatsRequest; the engine computes exactly that during the attention
pass of every layer and hands the policy one LayerStats per layer. Attention statistics are per query head
[H, n] (un-reduced: GQA reduction and W_O weighting are the policy's business); token-side statistics are
per kv head [Hkv, n] unless stated. `n` is the number of keys the statistics are about (the cached
tokens of that layer at compression time, in cache order).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from kvx.errors import KvxError
from kvx.kernels.reference import QUERY_CHUNK, visibility_mask


@dataclass(frozen=True)
class StatsRequest:
    window: int = 0  # col_sum over the last `window` query rows (SnapKV family)
    window_sq: bool = False  # also col_sq over those rows (LaProx)
    last_row: bool = False  # probabilities of the last query row (TOVA)
    colsum_all: bool = False  # column sums over every query row (H2O prefill)
    sg_rows: int = 0  # AhaKV: step-gain softmax column sums over the last sg_rows rows ...
    sg_budget: int = 0  # ... at lambda_i = sqrt(2 ln(i / sg_budget) / d)
    key_norm: bool = False  # ||k||_2 per kv head (KNorm)
    value_norm: bool = False  # ||v||_2 per kv head (ExpectedAttention, AhaKV uses its square)
    value_out_norm: bool = False  # ||v W_O^h||_2 per query head (LaProx)
    value_out_l1: bool = False  # ||v W_O^h||_1 per query head (CriticalKV)
    query_moments: bool = False  # pre-RoPE query mean / covariance per query head (ExpectedAttention)
    keys: bool = False  # the post-RoPE keys themselves, [Hkv, n, d] (a view, no copy: ExpectedAttention)
    # KVzip: after the prefill, reconstruction passes (runtime/compression/reconstruction.py) fill col_max. The prefill
    # itself computes nothing for them (needs_attention stays False). reconstruction = context tokens per
    # pass (0: no pass); the cue, the sinks in the scoring softmax and KVzip+'s row normaliser shape it too.
    reconstruction: int = 0
    reconstruction_cue: int = 0
    reconstruction_sinks: int = 0
    reconstruction_plus: bool = False
    reconstruction_keep_prefix: bool = False  # the chat template's prefix: kept whole, the scoring's sinks

    def merge(self, other: "StatsRequest") -> "StatsRequest":
        """The union of two requests (largest window, any flag set in either)."""
        values = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            values[f.name] = max(a, b) if isinstance(a, int) and not isinstance(a, bool) else (a or b)
        return StatsRequest(**values)

    @property
    def needs_attention(self) -> bool:
        return bool(self.window or self.last_row or self.colsum_all or self.sg_rows)


@dataclass
class LayerStats:
    """What one layer's attention pass emitted. Unrequested fields stay None."""

    n: int  # number of keys
    positions: Tensor  # [n] absolute position of each key (shared by all heads at prefill)
    col_sum: Tensor | None = None  # [H, n] sum over window rows of A[t, j]
    col_sq: Tensor | None = None  # [H, n] sum over window rows of A[t, j]^2
    last_row: Tensor | None = None  # [H, n] A[last, j]
    colsum_all: Tensor | None = None  # [H, n] sum over all rows t >= j of A[t, j]
    colsum_count: Tensor | None = None  # [n] number of query rows that could see key j
    col_sum_sg: Tensor | None = None  # [H, n] AhaKV step-gain softmax column sums over the last sg_rows rows
    key_norm: Tensor | None = None  # [Hkv, n]
    value_norm: Tensor | None = None  # [Hkv, n]
    value_out_norm: Tensor | None = None  # [H, n]
    value_out_l1: Tensor | None = None  # [H, n]
    q_mean: Tensor | None = None  # [H, d] pre-RoPE
    q_cov: Tensor | None = None  # [H, d, d] pre-RoPE
    keys: Tensor | None = None  # [Hkv, n, d] post-RoPE keys (a view of the cache)
    col_max: Tensor | None = None  # [H, n] KVzip: max over reconstruction query rows of A[t, j]
    window: int = 0  # rows the window statistics were taken over
    query_position: int = 0  # absolute position of the last query row (AhaKV's i, RoPE of future queries)
    protected_prefix: int = 0  # leading keys the producer says are always kept (KVzip: the template's prefix)


# ---------------------------------------------------------------------------------------------------------
# Plain-PyTorch computation of the statistics (CPU path and oracle for the Triton kernels).
# ---------------------------------------------------------------------------------------------------------

# Query rows whose probabilities are formed at once: memory stays O(ROW_CHUNK * S) per query head.
ROW_CHUNK = QUERY_CHUNK
# Elements (query heads x rows x model dim) of one explicit v @ W_O^h tile for value_out_l1.
L1_TILE_ELEMENTS = 1 << 24
# Keys per tile for the Gram-form norm, so the [H, keys, d] intermediate stays bounded.
GRAM_KEY_TILE = 4096
# ExpectedAttention leaves the attention sinks out of the query moments.
SINK_TOKENS = 4


def wo_gram(o_proj_weight: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """[H, d, d] float32 Gram matrices G_h = W_O^h (W_O^h)^T, W_O^h = o_proj_weight[:, h*d:(h+1)*d].T.

    o_proj_weight is in HF layout [hidden, H*d]. ||v W_O^h||_2 = sqrt(v^T G_h v), so a layer's output-aware
    value norms cost O(n d^2) per head instead of O(n d D).
    """
    per_head = _wo_per_head(o_proj_weight, num_heads, head_dim)  # [H, d, D]
    return torch.matmul(per_head, per_head.transpose(-1, -2))


def compute_layer_stats(
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
    """The statistics `req` asks for, for one layer; everything unrequested stays None.

    q: [H, T, d] post-RoPE queries at positions q_pos [T]; k, v: [Hkv, S, d] at positions k_pos [S].
    Probabilities use the model's scale and exactly the visibility of reference.visibility_mask, so they
    equal the attention the model computed. All results are float32.
    """
    H, T, d = q.shape
    Hkv, S, _ = k.shape
    if H % Hkv:
        raise ValueError(f"{H} query heads cannot share {Hkv} kv heads")
    G = H // Hkv
    window = min(req.window, T)
    stats = LayerStats(n=S, positions=k_pos, window=window, query_position=int(q_pos[-1]) if T else 0)

    if req.needs_attention:
        if T == 0:
            raise ValueError("attention statistics need at least one query row")
        qg = q.reshape(Hkv, G, T, d).float()
        kt = k.float().transpose(-1, -2)  # [Hkv, d, S]
        rows = _RowSource(qg, kt, q_pos, k_pos, sliding_window)
        if window or req.last_row:
            _fill_window_stats(stats, req, rows, scale, window)
        if req.colsum_all:
            stats.colsum_all, stats.colsum_count = _colsum_all(rows, scale)
        if req.sg_rows:
            stats.col_sum_sg = _col_sum_sg(rows, scale, req.sg_rows, req.sg_budget)

    if req.key_norm:
        stats.key_norm = torch.linalg.vector_norm(k.float(), dim=-1)
    if req.value_norm:
        stats.value_norm = torch.linalg.vector_norm(v.float(), dim=-1)
    if req.value_out_norm:
        if gram is None:
            if o_proj_weight is None:
                raise ValueError("value_out_norm needs gram or o_proj_weight")
            gram = wo_gram(o_proj_weight, H, d)
        stats.value_out_norm = _value_out_norm(v, gram.to(device=v.device, dtype=torch.float32))
    if req.value_out_l1:
        if o_proj_weight is None:
            raise ValueError("value_out_l1 needs o_proj_weight")
        stats.value_out_l1 = _value_out_l1(v, _wo_per_head(o_proj_weight.to(v.device), H, d))
    if req.query_moments:
        if q_pre_rope is None:
            raise ValueError("query_moments needs q_pre_rope")
        stats.q_mean, stats.q_cov = _query_moments(q_pre_rope, q_pos)
    if req.keys:
        stats.keys = k
    return stats


def sg_scales(q_pos: Tensor, sg_budget: int, head_dim: int, scale: float) -> Tensor:
    """[T] float32 AhaKV step-gain scales lambda_i = sqrt(2 ln(i / sg_budget) / d), i = q_pos + 1.

    The formula targets a row entropy of ln(sg_budget); it falls below 1/sqrt(d) when i / sg_budget < e^(1/2)
    and is undefined for i <= sg_budget. In that regime the scoring softmax would be flatter than the
    model's own attention, which only blurs the score, so lambda is clamped from below by the model's scale.
    We clamp everywhere (lambda = max(formula, scale)): for the usual scale = 1/sqrt(d) this only changes
    rows with i / sg_budget <= e^(1/2), and for models with another scale it keeps the same guarantee.
    """
    if sg_budget <= 0:
        raise KvxError(f"AhaKV needs a positive cache budget for its step-gain softmax, got {sg_budget}")
    ratio = (q_pos.to(torch.float64) + 1.0) / sg_budget
    formula = torch.sqrt(2.0 * torch.log(ratio.clamp(min=1.0)) / head_dim)
    return formula.clamp(min=scale).to(torch.float32)


# --- attention-side helpers --------------------------------------------------------------------------------


@dataclass
class _RowSource:
    """Everything needed to form softmax rows for any range of query rows."""

    qg: Tensor  # [Hkv, G, T, d] float32
    kt: Tensor  # [Hkv, d, S] float32
    q_pos: Tensor  # [T]
    k_pos: Tensor  # [S]
    sliding_window: int | None

    @property
    def num_rows(self) -> int:
        return self.qg.shape[2]

    def probs(self, t0: int, t1: int, row_scale: Tensor, keys: slice = slice(None)) -> Tensor:
        """[Hkv, G, t1-t0, keys] float32 softmax rows t0..t1-1 restricted to `keys`, logits q.k * row_scale.

        `keys` must contain every key the rows can see (see visible_keys); the rest would get probability 0.
        """
        Hkv, G, _, d = self.qg.shape
        rows = t1 - t0
        q_rows = self.qg[:, :, t0:t1].reshape(Hkv, G * rows, d)
        logits = torch.bmm(q_rows, self.kt[:, :, keys]).view(Hkv, G, rows, -1)
        logits.mul_(row_scale.to(logits.device).view(1, 1, rows, 1))
        visible = visibility_mask(self.q_pos[t0:t1], self.k_pos[keys], self.sliding_window)
        logits.masked_fill_(~visible, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if not bool(visible.any(dim=1).all()):
            probs = probs.nan_to_num_(nan=0.0)  # a row that sees no key contributes nothing
        return probs

    def visible_keys(self, t0: int, t1: int) -> slice:
        """The smallest contiguous key range holding every key that rows t0..t1-1 can see.

        Cache order is position order, so for causal (and sliding-window) rows this skips the future
        keys -- about half the work of a full prefill pass.
        """
        seen = visibility_mask(self.q_pos[t0:t1], self.k_pos, self.sliding_window).any(dim=0).nonzero()
        if seen.numel() == 0:
            return slice(0, 0)
        return slice(int(seen[0]), int(seen[-1]) + 1)

    def chunks(self, first_row: int):
        for t0 in range(first_row, self.num_rows, ROW_CHUNK):
            yield t0, min(self.num_rows, t0 + ROW_CHUNK)


def _per_query_head(x: Tensor) -> Tensor:
    """[Hkv, G, S] -> [H, S] (query head h = g * G + i)."""
    return x.reshape(-1, x.shape[-1])


def _fill_window_stats(stats: LayerStats, req: StatsRequest, rows: _RowSource, scale: float, window: int) -> None:
    Hkv, G, T, _ = rows.qg.shape
    S = rows.kt.shape[-1]
    first = T - max(window, 1 if req.last_row else 0)
    col_sum = rows.qg.new_zeros(Hkv, G, S) if window else None
    col_sq = rows.qg.new_zeros(Hkv, G, S) if window and req.window_sq else None
    last = None
    for t0, t1 in rows.chunks(first):
        p = rows.probs(t0, t1, torch.full((t1 - t0,), scale, dtype=torch.float32))
        last = p[:, :, -1]
        if col_sum is not None:  # rows start at the window (or at the last row when there is no window)
            col_sum += p.sum(dim=2)
        if col_sq is not None:
            col_sq += p.square().sum(dim=2)
    if col_sum is not None:
        stats.col_sum = _per_query_head(col_sum)
    if col_sq is not None:
        stats.col_sq = _per_query_head(col_sq)
    if req.last_row and last is not None:
        stats.last_row = _per_query_head(last.contiguous())


def _colsum_all(rows: _RowSource, scale: float) -> tuple[Tensor, Tensor]:
    Hkv, G, _, _ = rows.qg.shape
    S = rows.kt.shape[-1]
    total = rows.qg.new_zeros(Hkv, G, S)
    for t0, t1 in rows.chunks(0):
        keys = rows.visible_keys(t0, t1)
        if keys.stop > keys.start:
            total[:, :, keys] += rows.probs(t0, t1, torch.full((t1 - t0,), scale, dtype=torch.float32), keys).sum(2)
    return _per_query_head(total), visible_row_counts(rows.q_pos, rows.k_pos, rows.sliding_window)


def visible_row_counts(q_pos: Tensor, k_pos: Tensor, sliding_window: int | None) -> Tensor:
    """[S] float32: how many query rows see each key (H2O's normaliser), without forming the [T, S] mask."""
    count = torch.zeros(k_pos.shape[0], dtype=torch.float32, device=k_pos.device)
    for t0 in range(0, q_pos.shape[0], ROW_CHUNK):
        count += visibility_mask(q_pos[t0:t0 + ROW_CHUNK], k_pos, sliding_window).sum(dim=0)
    return count


def _col_sum_sg(rows: _RowSource, scale: float, sg_rows: int, sg_budget: int) -> Tensor:
    Hkv, G, T, d = rows.qg.shape
    S = rows.kt.shape[-1]
    lam = sg_scales(rows.q_pos, sg_budget, d, scale)
    total = rows.qg.new_zeros(Hkv, G, S)
    for t0, t1 in rows.chunks(T - min(sg_rows, T)):
        total += rows.probs(t0, t1, lam[t0:t1]).sum(dim=2)
    return _per_query_head(total)


def col_max_over_rows(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float,
                      row_weight: Tensor | None = None) -> Tensor:
    """[H, S] float32: max over the query rows t of A[t, j] (times row_weight[t] when given).

    q: [H, T, d] post-RoPE rows at positions q_pos [T]; k: [Hkv, S, d] at k_pos [S]. A is the softmax of
    each row over exactly these keys (causal by position, the model's scale), so a caller that passes a key
    subset (KVzip: sinks + one context chunk + the rows' own keys) gets the softmax over that subset.
    Rows are processed ROW_CHUNK at a time: memory O(ROW_CHUNK * S) per query head, no [T, S] matrix.
    """
    H, T, d = q.shape
    Hkv, S, _ = k.shape
    G = H // Hkv
    rows = _RowSource(q.reshape(Hkv, G, T, d).float(), k.float().transpose(-1, -2), q_pos, k_pos, None)
    best = rows.qg.new_zeros(Hkv, G, S)
    for t0, t1 in rows.chunks(0):
        p = rows.probs(t0, t1, torch.full((t1 - t0,), scale, dtype=torch.float32))
        if row_weight is not None:
            p = p * row_weight[t0:t1].float().to(p.device).view(1, 1, -1, 1)
        best = torch.maximum(best, p.amax(dim=2))
    return _per_query_head(best)


# --- token-side helpers ------------------------------------------------------------------------------------


def _wo_per_head(o_proj_weight: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """[H, d, D] float32: W_O^h for every query head, from the HF layout [D, H*d]."""
    if o_proj_weight.dim() != 2 or o_proj_weight.shape[1] != num_heads * head_dim:
        raise KvxError(
            f"o_proj weight has shape {tuple(o_proj_weight.shape)}, expected [hidden, {num_heads * head_dim}]"
        )
    D = o_proj_weight.shape[0]
    return o_proj_weight.float().view(D, num_heads, head_dim).permute(1, 2, 0)


def _value_out_norm(v: Tensor, gram: Tensor) -> Tensor:
    """[H, S] sqrt(v^T G_h v) with v from the kv head of query head h."""
    Hkv, S, d = v.shape
    G = gram.shape[0] // Hkv
    gram_g = gram.view(Hkv, G, d, d)
    out = torch.empty(Hkv, G, S, dtype=torch.float32, device=v.device)
    for s0 in range(0, S, GRAM_KEY_TILE):
        s1 = min(S, s0 + GRAM_KEY_TILE)
        vs = v[:, s0:s1].float().unsqueeze(1)  # [Hkv, 1, s, d]
        quad = (torch.matmul(vs, gram_g) * vs).sum(dim=-1)  # [Hkv, G, s]
        out[:, :, s0:s1] = quad.clamp(min=0).sqrt()  # rounding can push a ~0 quadratic form below 0
    return _per_query_head(out)


def _value_out_l1(v: Tensor, wo: Tensor) -> Tensor:
    """[H, S] ||v W_O^h||_1: explicit product (no Gram form for L1), tiled over keys."""
    Hkv, S, d = v.shape
    H, _, D = wo.shape
    G = H // Hkv
    wo_g = wo.reshape(Hkv, G, d, D)
    tile = max(1, L1_TILE_ELEMENTS // (H * D))
    out = torch.empty(Hkv, G, S, dtype=torch.float32, device=v.device)
    for s0 in range(0, S, tile):
        s1 = min(S, s0 + tile)
        projected = torch.matmul(v[:, s0:s1].float().unsqueeze(1), wo_g)  # [Hkv, G, s, D]
        out[:, :, s0:s1] = projected.abs().sum(dim=-1)
    return _per_query_head(out)


def _query_moments(q_pre_rope: Tensor, q_pos: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [H, d] and population covariance [H, d, d] of pre-RoPE queries, sinks left out when possible."""
    keep = q_pos >= SINK_TOKENS
    qs = q_pre_rope[:, keep] if bool(keep.any()) else q_pre_rope
    qs = qs.float()
    mean = qs.mean(dim=1)
    centered = qs - mean.unsqueeze(1)
    cov = torch.matmul(centered.transpose(-1, -2), centered) / qs.shape[1]
    return mean, cov

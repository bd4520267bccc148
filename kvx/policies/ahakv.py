"""AhaKV (arXiv 2506.03762): recent accumulation of a sharpened softmax, times a value-norm prior.

Accumulated attention over all queries favours early tokens (each is seen by more queries), so AhaKV sums
only over the last r query rows, all of which see every candidate. Those rows are re-normalised with the
step-gain scale λ_i = sqrt(2 ln(i/k) / d) on the raw logits q·k, chosen so that a row's expected entropy
is ln k (k: the per-head budget); for i ≫ k it is sharper than the model's 1/sqrt(d). The score is
multiplied by γ̄ = AvgPool(||v||²) / max per head. The r most recent tokens are protected; while decoding,
the scores are recomputed from the last r queries of the group. Details from notes on the paper (no
public code; see POLICIES.md 1): the pooling kernel and the group mean are assumptions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kvx.kernels.stats import LayerStats, StatsRequest
from kvx.policies.base import (
    DecodeBatch,
    DecodeView,
    ScoreContext,
    Scorer,
    gqa_mean,
    keep_with_protected,
    pool_candidates,
    pool_keys,
    recent_indices,
)


def sg_scale(visible: Tensor | float, budget: int, head_dim: int, floor: float = 0.0) -> Tensor:
    """λ_i = sqrt(2 ln(i / k) / d) for a row that sees i keys, at least `floor`.

    The formula is undefined for i <= k and flatter than the model's softmax for i/k < e^(1/2); like the
    prefill statistics (kernels.stats.sg_scales) we clamp it from below by the model's scale there.
    """
    i = torch.as_tensor(visible, dtype=torch.float64)
    formula = torch.sqrt(2.0 * torch.log(i / max(budget, 1)).clamp(min=0.0) / head_dim)
    return formula.clamp(min=floor).float()


def value_prior(value_norm: Tensor, lo: int, hi: int, kernel: int, count_pad: bool = False) -> Tensor:
    """γ̄ [..., n]: AvgPool(||v||²) over the candidates [lo, hi), divided by its per-head maximum there.

    The pool averages only the candidates inside each window (count_pad=False): counting the zero padding
    would lower the prior of the first and last kernel//2 candidates (the last ones, just before the
    recent window, are often the question)."""
    nu = value_norm.float() ** 2
    prior = torch.ones_like(nu)
    if hi > lo:
        pooled = pool_keys(nu[..., lo:hi], kernel, "avg", count_pad=count_pad)
        prior[..., lo:hi] = pooled / pooled.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return prior


def sg_column_sums(queries: Tensor, query_positions: Tensor, keys: Tensor, key_positions: Tensor,
                   budget: int, floor: float = 0.0, visible: str = "keys") -> Tensor:
    """Σ over the query rows of the step-gain softmax (causal by position): [G, r, d] x [n, d] -> [G, n].

    λ_i's `i` is the number of keys row i's softmax runs over (visible="keys"), or its absolute position + 1
    (visible="position", kvx's earlier choice: over a cache compressed to about k keys it over-sharpens the
    row, an entropy near ln(k²/i) instead of ln k)."""
    d = keys.shape[-1]
    logits = torch.einsum("grd,nd->grn", queries.float(), keys.float())
    hidden = key_positions[None, None, :] > query_positions[None, :, None]
    if visible == "position":
        seen = query_positions.cpu() + 1
    else:
        seen = (~hidden[0]).sum(dim=-1).cpu()
    lam = sg_scale(seen, budget, d, floor).to(logits.device)
    scaled = logits * lam[None, :, None]
    scaled = scaled.masked_fill(hidden, float("-inf"))
    return torch.softmax(scaled, dim=-1).sum(dim=1)


@dataclass
class AhaKVScorer(Scorer):
    name = "ahakv"
    decode_mode = "recent_queries"
    window: int = field(default=32, metadata={"min": 1, "help": "r: recent query rows scored, and tokens protected"})
    kernel: int = field(default=7, metadata={"min": 0, "help": "avg-pool kernel of the value-norm prior"})
    sinks: int = field(default=0, metadata={"min": 0, "help": "first tokens always kept"})
    # Not in the paper (default 1 = off): max-pooling the accumulated score keeps an attended token's
    # neighbours, as SnapKV does; it matters when an answer spans many small tokens (digits).
    score_kernel: int = field(default=1, metadata={"min": 0, "help": "max-pool kernel of the attention score (1 = none, as in the paper)"})
    decode_scale: str = field(default="keys", metadata={
        "choices": ("keys", "position"),
        "help": "decode: lambda's i is the number of cached keys the row sees (keys) or its absolute position"})
    prior_pad: str = field(default="exclude", metadata={
        "choices": ("exclude", "include"),
        "help": "the value prior's avg-pool averages only real candidates (exclude) or counts the zero padding"})

    def request(self) -> StatsRequest:
        # sg_budget is the per-head budget k, known once the budget and prompt are: Policy.request_for().
        return StatsRequest(sg_rows=self.window, value_norm=True)

    def score(self, stats: LayerStats, ctx: ScoreContext) -> Tensor:
        recent = pool_candidates(gqa_mean(stats.col_sum_sg.float(), ctx.num_kv_heads), ctx, self.score_kernel, "max")
        return recent * value_prior(stats.value_norm, ctx.lo, ctx.hi, self.kernel, self.prior_pad == "include")

    def decode_keep(self, view: DecodeView, keep_count: int) -> Tensor:
        n, device = view.n, view.device
        sinks = min(self.sinks, n)
        window = min(self.window, n - sinks)
        protected = torch.cat([torch.arange(sinks, device=device), recent_indices(n - sinks, window, device) + sinks])
        return keep_with_protected(self.decode_score(view, keep_count), protected, keep_count)

    def decode_score(self, view: DecodeView, keep_count: int) -> Tensor:
        """[n] one segment's score: the step-gain column sums of the last r queries (mean over the group)
        times the value prior over the candidates [sinks, n - window)."""
        n, device = view.n, view.device
        sinks = min(self.sinks, n)
        window = min(self.window, n - sinks)
        queries = view.recent_queries
        if queries is None or queries.shape[1] == 0:
            accumulated = torch.ones(n, device=device)
        else:
            r = queries.shape[1]
            q_pos = torch.arange(view.query_position - r + 1, view.query_position + 1, device=device)
            accumulated = sg_column_sums(queries, q_pos, view.keys, view.positions.to(device), keep_count,
                                         view.scale, self.decode_scale).mean(0)
        return accumulated * value_prior(view.values.norm(dim=-1), sinks, n - window, self.kernel,
                                         self.prior_pad == "include")

    # -- the batched engine's eviction round: decode_keep over many segments at once --------------------
    def decode_rule(self, n: np.ndarray, keep_count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sinks = np.minimum(self.sinks, n)
        return sinks, np.minimum(self.window, n - sinks)

    def decode_scores(self, batch: DecodeBatch) -> Tensor:
        """decode_score() for every row at once (rows padded to the longest; what lies past a row's length
        is never read by the ranking)."""
        valid, pos = batch.valid, batch.positions
        n = batch.n
        queries = batch.recent_queries
        if queries is None or queries.shape[2] == 0:
            accumulated = torch.ones(valid.shape, device=valid.device)
        else:
            r = queries.shape[2]
            q_pos = batch.query_position - r + 1 + torch.arange(r, device=valid.device)  # [rows, r]
            logits = torch.einsum("xgrd,xnd->xgrn", queries.float(), batch.keys.float())
            visible = (pos[:, None, :] <= q_pos[:, :, None]) & valid[:, None, :]  # [rows, r, L]
            seen = (q_pos + 1) if self.decode_scale == "position" else visible.sum(dim=-1)
            lam = _sg_scale_rows(seen, batch.keep, batch.head_dim, batch.scale)
            scaled = (logits * lam[:, None, :, None]).masked_fill(~visible[:, None], float("-inf"))
            accumulated = torch.softmax(scaled, dim=-1).sum(dim=2).mean(dim=1)
        sinks = torch.clamp(n, max=self.sinks)
        hi = n - torch.minimum(n - sinks, torch.full_like(n, self.window))
        idx = torch.arange(valid.shape[1], device=valid.device)[None, :]
        candidate = (idx >= sinks) & (idx < hi)
        nu = batch.values.norm(dim=-1).float() ** 2 * candidate  # norm in the cache's dtype, as decode_score
        if self.kernel > 1:
            k = self.kernel
            avg = F.avg_pool1d(nu[:, None], k, stride=1, padding=k // 2, count_include_pad=True)[:, 0, :nu.shape[1]]
            if self.prior_pad == "include":
                pooled = avg
            else:  # average over the candidates inside each window only, as pool_keys(count_pad=False)
                count = F.avg_pool1d(candidate[:, None].float(), k, stride=1, padding=k // 2,
                                     count_include_pad=True)[:, 0, :nu.shape[1]]
                pooled = avg / count.clamp(min=1e-30)
        else:
            pooled = nu
        pooled = pooled * candidate
        top = pooled.amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        prior = torch.where(candidate, pooled / top, torch.ones_like(pooled))
        return accumulated * prior


def _sg_scale_rows(seen: Tensor, keep: Tensor, head_dim: int, floor: float) -> Tensor:
    """sg_scale for [rows, r] rows that see `seen` keys, each row with its own budget keep [rows, 1]."""
    i = seen.to(torch.float64)
    formula = torch.sqrt(2.0 * torch.log(i / keep.to(torch.float64).clamp(min=1)).clamp(min=0.0) / head_dim)
    return formula.clamp(min=floor).float()



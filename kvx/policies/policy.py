"""A policy: a scorer (token importance), an allocator (entries per layer and kv head), protected tokens.

select() turns the statistics of every layer into the indices each (layer, kv head) keeps. Protected
tokens — the first `sinks` and the last `window` of every head — are kept first and count against the
budget; when a head's count is smaller than its protected set, the sinks win, then the most recent.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from torch import Tensor

from kvx.kernels.stats import LayerStats, StatsRequest
from kvx.policies.allocation import Allocator, LayerCandidates
from kvx.policies.base import DecodeView, ScoreContext, Scorer, recent_indices, top_indices
from kvx.policies.budget import Budget


@dataclass
class SelectionOptions:
    """Options of the prefill selection that every scoring policy takes (`kvx generate --policy-arg`)."""

    # One token set per layer: the scores are averaged over the layer's kv heads before the top-k, so a
    # token that any head attends to strongly stays in every head. TOVA's paper ranks this way; what it
    # buys depends on the method and task (docs/results.md: large for TOVA on passkey, a tie for SnapKV).
    heads: str = field(default="group", metadata={
        "choices": ("group", "layer"),
        "help": "prefill: rank each kv head by its own scores (group), or all by the layer's mean (layer)"})


@dataclass
class _LayerPlan:
    scores: Tensor  # [Hkv, n]
    second: Tensor | None  # [Hkv, n] stage-two scores (CriticalKV) or None
    protected: Tensor  # protected indices in priority order
    lo: int
    hi: int


class Policy:
    def __init__(self, name: str, scorer: Scorer | None, allocator: Allocator,
                 selection: SelectionOptions | None = None):
        self.name = name
        self.scorer = scorer  # None: keep everything ("full")
        self.allocator = allocator
        self.selection = selection or SelectionOptions()

    # -- what the engine reads ---------------------------------------------------------------------
    @property
    def sinks(self) -> int:
        return self.scorer.sinks if self.scorer is not None else 0

    @property
    def window(self) -> int:
        return self.scorer.window if self.scorer is not None else 0

    @property
    def decode_mode(self) -> str | None:
        return self.scorer.decode_mode if self.scorer is not None else None

    @property
    def request(self) -> StatsRequest:
        """What the attention must emit. AhaKV's sg_budget depends on the budget: see request_for()."""
        return self.scorer.request() if self.scorer is not None else StatsRequest()

    def request_for(self, budget: Budget, n_tokens: int) -> StatsRequest:
        """The request for a context of n_tokens under budget (fills in AhaKV's per-head budget k)."""
        req = self.request
        if req.sg_rows:
            req = replace(req, sg_budget=budget.per_head(n_tokens))
        return req

    def set_model_info(self, **info) -> None:
        """Model facts some scorers need (ExpectedAttention: inv_freq, rope_theta, head_dim)."""
        if self.scorer is not None and hasattr(self.scorer, "set_model_info"):
            self.scorer.set_model_info(**info)

    def describe(self) -> str:
        """'snapkv [allocation=ada alpha=0.2 window=32 ...]': the policy with every option in effect."""
        parts = [f"allocation={self.allocator.name}"]
        for owner in (self.scorer, self.allocator, self.selection if self.scorer is not None else None):
            if owner is not None:
                parts += [f"{f.name}={getattr(owner, f.name)}" for f in fields(owner)]
        return f"{self.name} [{' '.join(parts)}]"

    # -- prefill selection -------------------------------------------------------------------------
    def select(self, stats: list[LayerStats], budget: Budget, num_kv_heads: int, num_heads: int,
               head_dim: int) -> list[list[Tensor]]:
        """Per layer, per kv head: sorted int64 indices into that layer's keys to keep."""
        L = len(stats)
        sizes = [s.n for s in stats]
        n = max(sizes)
        if self.scorer is None or budget.keeps_everything(n):
            return [[torch.arange(s.n, device=s.positions.device) for _ in range(num_kv_heads)] for s in stats]
        if self.scorer.window_on_top():
            # The window is kept on top: the budget applies to the n - w others (K = rho L Hkv (n - w)).
            w = min(self.scorer.window, n - 1)
            total = budget.total_entries(n - w, L, num_kv_heads) + L * num_kv_heads * w
        else:
            total = budget.total_entries(n, L, num_kv_heads)
        total = min(total, num_kv_heads * sum(sizes))
        per_head = total / (L * num_kv_heads)
        plans, candidates = [], []
        for layer, st in enumerate(stats):
            plan = self._plan(st, layer, L, num_kv_heads, num_heads, head_dim, per_head)
            plans.append(plan)
            candidates.append(LayerCandidates(plan.scores[:, plan.lo:plan.hi], plan.protected.numel(), st.n))
        counts = self.allocator.allocate(candidates, total)
        if sum(map(sum, counts)) != total:
            raise RuntimeError(f"{self.allocator.name} allocated {sum(map(sum, counts))} entries, not {total}")
        return [[self._keep_head(plan, g, c) for g, c in enumerate(layer_counts)]
                for plan, layer_counts in zip(plans, counts)]

    def _plan(self, st: LayerStats, layer: int, L: int, hkv: int, H: int, d: int, per_head: float) -> _LayerPlan:
        device = st.positions.device
        sinks = min(max(self.scorer.sinks, st.protected_prefix), st.n)
        window = max(0, min(self.scorer.protected_window(per_head), st.n - sinks))
        ctx = ScoreContext(layer=layer, num_layers=L, num_kv_heads=hkv, num_heads=H, head_dim=d,
                           lo=sinks, hi=st.n - window, per_head=per_head)
        scores = self.scorer.score(st, ctx).float()
        second = None
        if self.scorer.first_stage_ratio < 1.0:
            second = self.scorer.stage_two(st, ctx, scores)
            second = None if second is None else second.float()
        if self.selection.heads == "layer":
            scores = _layer_mean(scores)
            second = None if second is None else _layer_mean(second)
        protected = torch.cat([torch.arange(sinks, device=device), recent_indices(st.n, window, device)])
        return _LayerPlan(scores=scores, second=second, protected=protected, lo=ctx.lo, hi=ctx.hi)

    def _keep_head(self, plan: _LayerPlan, g: int, count: int) -> Tensor:
        protected = plan.protected
        if count <= protected.numel():
            return torch.sort(protected[:count]).values
        extra = count - protected.numel()
        candidates = plan.scores[g, plan.lo:plan.hi]
        if plan.second is None:
            picks = top_indices(candidates, extra)
        else:
            # CriticalKV: the first stage (a share of the whole head count, protected tokens included)
            # by the base score, the rest by the stage-two score.
            first = min(extra, max(0, int(count * self.scorer.first_stage_ratio) - protected.numel()))
            stage_one = top_indices(candidates, first)
            rest = plan.second[g, plan.lo:plan.hi].clone()
            rest[stage_one] = float("-inf")
            picks = torch.cat([stage_one, top_indices(rest, extra - first)])
        return torch.sort(torch.cat([protected, picks + plan.lo])).values

    # -- decode-time eviction (per head: heads=layer shapes the prefill selection only) ----------------------------------------------------------------------
    def decode_keep(self, view: DecodeView, keep_count: int) -> Tensor:
        """Sorted indices of the segment to keep so that it holds keep_count entries."""
        n = view.n
        if keep_count >= n:
            return torch.arange(n, device=view.device)
        if self.scorer is None or self.decode_mode is None:
            raise RuntimeError(f"policy {self.name} has no decode-time eviction")
        return self.scorer.decode_keep(view, keep_count)

    def decode_rule(self, n: np.ndarray, keep_count: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """decode_keep() as (sinks, recent) protected + the rest by the scorer's decode_scores()
        (Scorer.decode_rule), for the batched engine; None when only decode_keep() can choose."""
        if self.scorer is None or self.decode_mode is None:
            return None
        return self.scorer.decode_rule(n, keep_count)


def _layer_mean(scores: Tensor) -> Tensor:
    """[Hkv, n] -> the mean over the kv heads, the same row for every head."""
    return scores.mean(dim=0, keepdim=True).expand_as(scores).contiguous()

"""The answer to "which policy at this budget?": per setting and budget, the best policy of each runtime.

A setting (setting.py) is one task, context length, haystack and mode; within it every budget gets kvx's
best policy and each baseline's best press (kvpress's), with the score, what the cache really held and
how many samples the cell has, and the full cache's score as the ceiling. Computed from the cells
report.summarize makes, so these numbers are the full table's numbers, picked.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvx.eval.report import Cell, budget_sort_key, is_reference, runtime_of, summarize
from kvx.eval.setting import Setting, by_setting

KVX = "kvx"
# Two means this close are the same score (they are sums of 0/1 and fractions over equal counts).
TIE = 1e-9


@dataclass
class Pick:
    """One runtime's best policy at one budget."""

    policy: str
    score: float
    kv_fraction: float  # mean K+V bytes held over the full cache's
    kv_bytes: float  # mean K+V bytes held
    samples: int
    tied: int = 0  # other policies of the same runtime with the same score


@dataclass
class BudgetRow:
    budget: str
    picks: dict[str, Pick | None]  # runtime -> its best policy (None: nothing scored at this budget)


@dataclass
class BestTable:
    setting: Setting
    runtimes: list[str]  # "kvx" first, then the baselines in the order their rows appear
    rows: list[BudgetRow]
    full_score: float | None  # kvx's full cache (else a baseline's), the ceiling of every row
    samples: int  # the most samples any cell of the setting has; a pick with fewer says so

    def to_dict(self) -> dict:
        s = self.setting
        return {
            "mode": s.mode, "task": s.task, "context": s.context, "haystack": s.haystack, "model": s.model,
            "full_score": _round(self.full_score), "samples": self.samples,
            "budgets": [{"budget": r.budget, **{rt: _pick_dict(p) for rt, p in r.picks.items()}} for r in self.rows],
        }


def best_tables(rows: list[dict]) -> list[BestTable]:
    """One BestTable per setting found in the rows (modes in setting.MODE_ORDER)."""
    return [best_table(setting, members) for setting, members in by_setting(rows).items()]


def best_table(setting: Setting, rows: list[dict]) -> BestTable:
    cells = [c for c in summarize(rows) if c.task == setting.task]
    runtimes = list(dict.fromkeys([KVX] + [runtime_of(c.policy) for c in cells]))
    budgets = sorted({c.budget for c in cells if not is_reference(c.policy)}, key=budget_sort_key)
    overall = overall_means(cells)
    table_rows = []
    for budget in budgets:
        picks = {}
        for runtime in runtimes:
            candidates = [c for c in cells if c.budget == budget and not is_reference(c.policy)
                          and runtime_of(c.policy) == runtime and c.mean_score is not None]
            picks[runtime] = pick(candidates, overall)
        table_rows.append(BudgetRow(budget=budget, picks=picks))
    if all(r.picks.get(KVX) is None for r in table_rows) and KVX in runtimes and len(runtimes) > 1:
        runtimes.remove(KVX)  # a file of baseline rows only: no empty kvx columns
    references = [c for c in cells if is_reference(c.policy) and c.mean_score is not None]
    references.sort(key=lambda c: runtime_of(c.policy) != KVX)
    return BestTable(setting=setting, runtimes=runtimes, rows=table_rows,
                     full_score=references[0].mean_score if references else None,
                     samples=max((c.samples for c in cells), default=0))


def overall_means(cells: list[Cell]) -> dict[str, float]:
    """Each policy's mean score over the budgets it has (dicts keep the order policies were listed in)."""
    scores: dict[str, list[float]] = {}
    for c in cells:
        if c.mean_score is not None and not is_reference(c.policy):
            scores.setdefault(c.policy, []).append(c.mean_score)
    return {p: sum(v) / len(v) for p, v in scores.items()}


def pick(candidates: list[Cell], overall: dict[str, float]) -> Pick | None:
    """The highest mean score. Among equal scores: the cell with more samples (a surer mean), then the
    smaller cache (as the table prints it, to 0.1%), then the policy best over every budget (so one policy, not a random one of the tied,
    is named down a column), then a policy with its default options, then the one listed first."""
    if not candidates:
        return None
    order = {p: i for i, p in enumerate(overall)}
    best = min(candidates, key=lambda c: (-c.mean_score, -c.samples, round(100 * c.kv_fraction, 1),
                                          -overall.get(c.policy, 0.0), "[" in c.policy,
                                          order.get(c.policy, len(order))))
    tied = sum(1 for c in candidates if c is not best and abs(c.mean_score - best.mean_score) <= TIE)
    return Pick(policy=best.policy, score=best.mean_score, kv_fraction=best.kv_fraction, kv_bytes=best.kv_bytes,
                samples=best.samples, tied=tied)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _pick_dict(p: Pick | None) -> dict | None:
    if p is None:
        return None
    return {"policy": p.policy, "score": _round(p.score), "kv_fraction": _round(p.kv_fraction),
            "kv_bytes": round(p.kv_bytes), "samples": p.samples, "tied": p.tied}

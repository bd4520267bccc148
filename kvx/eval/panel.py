"""What one picture panel shows, before matplotlib sees it: one setting's policies x budgets.

Kept apart from the drawing so that the tests can check the numbers a picture will print (one row per
policy, the table's scores) without reading pixels, and so the order is decided in one place:
the full caches first as reference rows, then the policies by mean score over the budgets, best first,
each baseline's press right under its kvx twin (kvpress:snapkv under snapkv) so a reader compares
the two implementations of a method on neighbouring rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvx.eval.report import Cell, budget_sort_key, is_reference, runtime_of, score_text, summarize
from kvx.eval.setting import Setting, by_setting


@dataclass
class PanelRow:
    policy: str
    cells: list[Cell | None]  # one per budget (a reference repeats its one cell); None: no row there
    reference: bool  # a full cache (kvx's, or a baseline's own)
    baseline: bool  # an external runtime's press (kvpress:...)

    def scores(self) -> list[float | None]:
        return [None if c is None else c.mean_score for c in self.cells]

    def mean(self) -> float | None:
        """Mean score over the budgets that have one: the sort key."""
        known = [s for s in self.scores() if s is not None]
        return sum(known) / len(known) if known else None

    def samples(self) -> int:
        """The most samples (answered or failed) any of the row's cells has."""
        return max((c.samples + c.errors for c in self.cells if c is not None), default=0)

    def texts(self) -> list[str]:
        """What each cell of the heatmap prints: the table's score, 'error', or '–' for no row."""
        return ["–" if c is None else score_text(c, with_kl=False) for c in self.cells]


@dataclass
class Panel:
    setting: Setting
    budgets: list[str]
    rows: list[PanelRow]

    @property
    def references(self) -> int:
        return sum(r.reference for r in self.rows)

    @property
    def samples(self) -> int:
        return max((r.samples() for r in self.rows), default=0)

    def label(self, row: PanelRow) -> str:
        """A row's name as drawn: references say so; a row with fewer samples than the panel's fullest
        says how many, since its mean is the less sure."""
        text = f"{row.policy} (reference)" if row.reference else row.policy
        n = row.samples()
        return f"{text}  n={n}" if n < self.samples else text

    def matrix(self) -> list[list[float | None]]:
        """Scores, a row per policy and a column per budget, in the order drawn (top row first)."""
        return [r.scores() for r in self.rows]


def build_panels(rows: list[dict]) -> list[Panel]:
    """One panel per setting in the rows (task, context, haystack, mode), modes in the usual order."""
    return [build_panel(setting, members) for setting, members in by_setting(rows).items()]


def build_panel(setting: Setting, rows: list[dict]) -> Panel:
    cells = [c for c in summarize(rows) if c.task == setting.task]
    budgets = sorted({c.budget for c in cells if not is_reference(c.policy)}, key=budget_sort_key)
    panel_rows = []
    for policy in dict.fromkeys(c.policy for c in cells):
        mine = {c.budget: c for c in cells if c.policy == policy}
        reference = is_reference(policy)
        if reference:
            only = next(iter(mine.values()))
            row_cells = [only] * max(len(budgets), 1)
        else:
            row_cells = [mine.get(b) for b in budgets]
        panel_rows.append(PanelRow(policy=policy, cells=row_cells, reference=reference,
                                   baseline=runtime_of(policy) != "kvx"))
    return Panel(setting=setting, budgets=budgets or ["100%"], rows=order_rows(panel_rows))


def order_rows(rows: list[PanelRow]) -> list[PanelRow]:
    """References first (kvx's before a baseline's), then groups sorted by their lead's mean score, best
    first; a group is a kvx policy and the presses named after it, or a press without a kvx twin."""
    references = sorted((r for r in rows if r.reference), key=lambda r: r.baseline)
    others = [r for r in rows if not r.reference]
    kvx_names = {r.policy for r in others if not r.baseline}
    groups: dict[str, list[PanelRow]] = {}
    for r in others:
        twin = twin_of(r.policy) if r.baseline else r.policy
        lead = twin if r.baseline and twin in kvx_names else r.policy
        groups.setdefault(lead, []).append(r)
    for members in groups.values():
        members.sort(key=lambda r: r.baseline)  # the kvx policy on top of its presses

    def rank(lead: str) -> float:
        mean = groups[lead][0].mean()
        return -1.0 if mean is None else mean

    # sorted() is stable: equal means keep the order the policies were listed in.
    ordered = sorted(groups, key=rank, reverse=True)
    return references + [r for lead in ordered for r in groups[lead]]


def twin_of(policy: str) -> str:
    """The kvx policy a baseline's press implements: 'kvpress:snapkv' -> 'snapkv'."""
    return policy.split(":", 1)[1] if ":" in policy else policy


def top_rows(panel: Panel, count: int) -> list[PanelRow]:
    """The `count` best non-reference rows by mean score (presses included), for the line chart."""
    ranked = sorted((r for r in panel.rows if not r.reference and r.mean() is not None),
                    key=lambda r: r.mean(), reverse=True)
    return ranked[:count]

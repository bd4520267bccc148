"""What an eval's rows say: mean score per (task, policy, budget), as a table or as JSON.

The pictures are drawn from the same cells (plot.py); the best policy per budget is best.py.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

FULL = "full"
ALL_TASKS = "all"


@dataclass
class Cell:
    task: str  # a task name, or "all" (every row of every task, each sample weighing the same)
    policy: str
    budget: str
    mean_score: float | None  # None when every row of the cell failed (see `errors`)
    samples: int
    kv_fraction: float  # mean of kv_bytes_held / kv_bytes_full
    kv_bytes: float = 0.0  # mean kv_bytes_held: what the compressed caches really allocated
    mean_kl: float | None = None  # only when the rows carry fidelity metrics
    top1: float | None = None
    errors: int = 0  # rows that recorded an error instead of an answer (external baselines)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("mean_score", "kv_fraction", "kv_bytes", "mean_kl", "top1"):
            if d[key] is not None:
                d[key] = round(d[key], 6)
        return d


def budget_sort_key(budget: str) -> tuple:
    """Percent budgets first (ascending), then token budgets (ascending), then anything else."""
    text = str(budget)
    try:
        if text.endswith("%"):
            return (0, float(text[:-1]), text)
        return (1, float(text), text)
    except ValueError:
        return (2, 0.0, text)


def summarize(rows: list[dict]) -> list[Cell]:
    """Mean score per (task, policy, budget); with several tasks also per (all, policy, budget)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    for row in rows:
        groups[(row["task"], row["policy"], str(row["budget"]))].append(row)
        if len(tasks) > 1:
            groups[(ALL_TASKS, row["policy"], str(row["budget"]))].append(row)
    order = {t: i for i, t in enumerate(tasks + [ALL_TASKS])}
    policies = policy_order(rows)
    cells = [_cell(key, members) for key, members in groups.items()]
    cells.sort(key=lambda c: (order[c.task], policies.index(c.policy), budget_sort_key(c.budget)))
    return cells


def runtime_of(policy: str) -> str:
    """'kvx' for kvx's own policies, else the baseline's name: 'kvpress' for 'kvpress:snapkv'."""
    name = policy.split("[", 1)[0]  # a policy's options may hold anything; only its name says the runtime
    return name.split(":", 1)[0] if ":" in name else "kvx"


def is_reference(policy: str) -> bool:
    """kvx's full cache, or an external baseline's own ("kvpress:full")."""
    return policy == FULL or policy.endswith(":" + FULL)


def policy_order(rows: list[dict]) -> list[str]:
    """Policies in the order they first appear, the full cache first."""
    seen = []
    for row in rows:
        if row["policy"] not in seen:
            seen.append(row["policy"])
    return sorted(seen, key=lambda p: (p != FULL, seen.index(p)))


def _cell(key: tuple, rows: list[dict]) -> Cell:
    task, policy, budget = key
    scored = [r for r in rows if r.get("score") is not None]
    fractions = [r["kv_bytes_held"] / r["kv_bytes_full"] for r in scored if r.get("kv_bytes_full")]
    held = [float(r["kv_bytes_held"]) for r in scored if r.get("kv_bytes_held") is not None]
    fid = [r["fidelity"] for r in rows if isinstance(r.get("fidelity"), dict)]
    return Cell(
        task=task, policy=policy, budget=budget, samples=len(scored), errors=len(rows) - len(scored),
        mean_score=sum(float(r["score"]) for r in scored) / len(scored) if scored else None,
        kv_fraction=sum(fractions) / len(fractions) if fractions else 0.0,
        kv_bytes=sum(held) / len(held) if held else 0.0,
        mean_kl=sum(f["kl"] for f in fid) / len(fid) if fid else None,
        top1=sum(f["top1"] for f in fid) / len(fid) if fid else None,
    )


# -- table --------------------------------------------------------------------------------------------

def render_summary(cells: list[Cell], console, title_suffix: str = "") -> None:
    """One rich table per task: a row per policy, a column per budget; the full cache as reference row."""
    from rich.markup import escape
    from rich.table import Table

    for task in dict.fromkeys(c.task for c in cells):
        mine = [c for c in cells if c.task == task]
        budgets = sorted({c.budget for c in mine if not is_reference(c.policy)}, key=budget_sort_key)
        table = Table(title=f"{task} — mean score{title_suffix}", title_justify="left")
        table.add_column("policy")
        for b in budgets:
            table.add_column(b, justify="right")
        for policy in dict.fromkeys(c.policy for c in mine):
            by_budget = {c.budget: c for c in mine if c.policy == policy}
            if is_reference(policy):
                ref = next(iter(by_budget.values()))
                text = score_text(ref)
                table.add_row(escape(f"{policy} (reference)"), *([text] * len(budgets) if budgets else [text]),
                              style="bold")
                continue
            # escape: rich would read a policy's options, "tova[heads=layer]", as a markup tag and drop them
            table.add_row(escape(policy), *[score_text(by_budget[b]) if b in by_budget else "-" for b in budgets])
        console.print(table)


def render_markdown(cells: list[Cell]) -> str:
    """The summary as Markdown tables (one per task), the best score of each budget in bold, and what the
    caches really held: mean K+V bytes over a full cache's, per runtime (kvx's, each baseline's)."""
    out = []
    for task in dict.fromkeys(c.task for c in cells):
        mine = [c for c in cells if c.task == task]
        budgets = sorted({c.budget for c in mine if not is_reference(c.policy)}, key=budget_sort_key)
        best = {b: max((c.mean_score for c in mine if c.budget == b and c.mean_score is not None
                        and not is_reference(c.policy)), default=None) for b in budgets}
        samples = sorted({c.samples + c.errors for c in mine})
        n = f"{samples[0]}" if len(samples) == 1 else f"{samples[0]}–{samples[-1]}"
        out.append(f"**{task}** ({n} samples per cell)\n")
        out.append("| policy | " + " | ".join(budgets) + " |")
        out.append("|---" * (len(budgets) + 1) + "|")
        for policy in dict.fromkeys(c.policy for c in mine):
            by_budget = {c.budget: c for c in mine if c.policy == policy}
            if is_reference(policy):
                ref = score_text(next(iter(by_budget.values())))
                out.append(f"| {policy} (reference) | " + " | ".join([ref] * len(budgets)) + " |")
                continue
            row = []
            for b in budgets:
                cell = by_budget.get(b)
                text = "-" if cell is None else score_text(cell)
                if cell is not None and cell.mean_score is not None and cell.mean_score == best[b] and best[b] > 0:
                    text = f"**{text}**"
                row.append(text)
            out.append(f"| {policy} | " + " | ".join(row) + " |")
        runtimes = dict.fromkeys(runtime_of(c.policy) for c in mine)
        for runtime in runtimes:
            fractions = []
            for b in budgets:
                held = [c.kv_fraction for c in mine if c.budget == b and not is_reference(c.policy)
                        and runtime_of(c.policy) == runtime and c.samples]
                fractions.append(f"{100 * sum(held) / len(held):.1f}%" if held else "-")
            out.append(f"| K+V held / full ({runtime}) | " + " | ".join(fractions) + " |")
        out.append("")
    return "\n".join(out)


def score_text(cell: Cell, with_kl: bool = True) -> str:
    """A cell's score as every table prints it (a picture's cells: without the KL, for room)."""
    if cell.mean_score is None:
        return "error"
    text = f"{cell.mean_score:.2f}"
    if with_kl and cell.mean_kl is not None:
        text += f" (KL {cell.mean_kl:.3f})"
    return text

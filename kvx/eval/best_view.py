"""The best-per-budget tables (best.py) as a person reads them: Markdown (docs/results.md opens with it),
a terminal table, or JSON. One table per mode, a block of budget rows per setting."""

from __future__ import annotations

from kvx.eval.best import BestTable, Pick

# What each mode means, in a few words, above its table (docs/eval.md has the whole story).
MODE_WORDS = {
    "agnostic": "the context compressed before the question is seen (a cache reused across questions)",
    "aware": "the whole prompt compressed, RULER's answer prefix included",
    "aware-plain": "the whole prompt compressed, ending with the plain question (no answer prefix)",
}


def render_best_markdown(tables: list[BestTable]) -> str:
    out = []
    for mode, group in _by_mode(tables).items():
        header, lines = _table(group)
        words = MODE_WORDS.get(mode)
        out.append(f"**{mode}**" + (f": {words}" if words else "") + "\n")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        out.extend("| " + " | ".join(cells) + " |" for cells in lines)
        out.append("")
    return "\n".join(out)


def render_best_rich(tables: list[BestTable], console) -> None:
    from rich.markup import escape
    from rich.table import Table

    for mode, group in _by_mode(tables).items():
        header, lines = _table(group)
        table = Table(title=f"{mode} — best policy per budget", title_justify="left")
        for i, name in enumerate(header):
            # fold, never "…": a policy's name cut short would name another policy
            table.add_column(name, justify="left" if i == 0 or name.endswith("'s best") else "right",
                             overflow="fold")
        for cells in lines:
            # escape: rich reads "tova[heads=layer]" as a markup tag and would drop the options
            table.add_row(*map(escape, cells))
        console.print(table)


def best_json(tables: list[BestTable]) -> list[dict]:
    return [t.to_dict() for t in tables]


def _by_mode(tables: list[BestTable]) -> dict[str, list[BestTable]]:
    groups: dict[str, list[BestTable]] = {}
    for t in tables:
        groups.setdefault(t.setting.mode, []).append(t)
    return groups


def _table(group: list[BestTable]) -> tuple[list[str], list[list[str]]]:
    """The header and the lines of one mode's table; a setting's name and full-cache score are written
    on its first budget row only, so the eye finds where each setting starts."""
    runtimes = list(dict.fromkeys(rt for t in group for rt in t.runtimes))
    with_model = len({t.setting.model for t in group}) > 1
    header = ["setting", "full cache", "budget"]
    for rt in runtimes:
        header += [f"{rt}'s best", "score", "K+V held"]
    lines = []
    for t in group:
        for i, row in enumerate(t.rows):
            first = i == 0
            cells = [setting_text(t, with_model) if first else "",
                     ("-" if t.full_score is None else f"{t.full_score:.2f}") if first else "", row.budget]
            for rt in runtimes:
                cells += pick_cells(row.picks.get(rt), t.samples)
            lines.append(cells)
    return header, lines


def setting_text(t: BestTable, with_model: bool = False) -> str:
    s = t.setting
    text = f"{s.task}, {context_text(s.context)}, {s.haystack}"
    return f"{text}, {s.model}" if with_model else text


def pick_cells(p: Pick | None, samples: int) -> list[str]:
    """[policy, score, K+V held]; a score over fewer samples than the setting's most says how many."""
    if p is None:
        return ["-", "-", "-"]
    name = p.policy + (f" (+{p.tied} tied)" if p.tied else "")
    score = f"{p.score:.2f}" + (f" (n={p.samples})" if p.samples < samples else "")
    return [name, score, f"{100 * p.kv_fraction:.1f}% ({size_text(p.kv_bytes)})"]


def context_text(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens and tokens % 1024 == 0 else str(tokens)


def size_text(n: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


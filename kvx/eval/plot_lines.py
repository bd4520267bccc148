"""The line chart: score against budget for the best few policies, the full cache as a dashed ceiling.

Only the best TOP policies (by mean score over the budgets, kvpress's presses included) are drawn: past
six or seven lines colours repeat and a reader cannot tell which is which; the heatmap has every policy.
Colours are Okabe and Ito's palette (distinct under the common colour-vision deficiencies), each line
has its own marker too, and a baseline's presses are dashed. Markers shrink line by line, so where
several policies score the same the earlier ones still show around the later ones.
"""

from __future__ import annotations

from kvx.eval.panel import Panel, top_rows
from kvx.eval.report import budget_sort_key, runtime_of

TOP = 6
# Okabe & Ito (2008), black kept for the full cache and yellow left out (too faint on white).
COLOURS = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7")
MARKERS = ("o", "s", "D", "^", "v", "P")
FONT = 9


def draw_lines(plt, panels: list[Panel], top: int = TOP):
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.2, 3.9 * len(panels)), squeeze=False,
                             layout="constrained")
    for ax, panel in zip(axes[:, 0], panels):
        draw_panel(ax, panel, top)
    return fig


def draw_panel(ax, panel: Panel, top: int = TOP) -> None:
    budgets = panel.budgets
    percent = all(b.endswith("%") for b in budgets)
    # Percent budgets on a log axis: 5% and 10% are as far apart as 25% and 50%.
    x_of = {b: (budget_sort_key(b)[1] if percent else i) for i, b in enumerate(budgets)}
    references = [r for r in panel.rows if r.reference and r.mean() is not None]
    if references:
        full = references[0]  # kvx's own when there is one (panel.py puts it first)
        ax.axhline(full.mean(), color="black", linestyle="--", linewidth=1.3, label=panel.label(full))
    best = top_rows(panel, min(top, len(COLOURS)))
    for i, row in enumerate(best):
        points = [(x_of[b], s) for b, s in zip(budgets, row.scores()) if s is not None]
        ax.plot([x for x, _ in points], [y for _, y in points], color=COLOURS[i], marker=MARKERS[i],
                markersize=10 - i, linewidth=1.8, linestyle="--" if row.baseline else "-", label=panel.label(row))
    if percent:
        ax.set_xscale("log")
    ax.set_xticks([x_of[b] for b in budgets], budgets, fontsize=FONT)
    ax.minorticks_off()
    ax.set_xlabel("KV budget (share of entries kept)" if percent else "KV budget", fontsize=FONT)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("mean score", fontsize=FONT)
    ax.tick_params(labelsize=FONT)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{panel.setting.title()} — best {len(best)} of {len(panel.rows) - panel.references} policies",
                 fontsize=FONT + 1, loc="left")
    baselines = list(dict.fromkeys(runtime_of(r.policy) for r in best if r.baseline))
    ax.legend(fontsize=FONT - 0.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              title=f"dashed: {', '.join(baselines)}" if baselines else None, title_fontsize=FONT - 0.5)

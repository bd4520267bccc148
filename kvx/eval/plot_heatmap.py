"""The heatmap: a row per policy, a column per budget, the mean score printed in every cell.

Colours come from cividis, whose lightness rises steadily from 0 to 1 and which reads the same to the
common colour-vision deficiencies (and in grey), so the colour only repeats what the printed number says.
Cells with no rows are light grey with a dash; a cell whose every row failed says "error".
"""

from __future__ import annotations

from kvx.eval.panel import Panel
from kvx.eval.report import runtime_of

CMAP = "cividis"
NO_DATA = "#e6e6e6"
PRESS_COLOUR = "#8a3b00"  # a dark vermillion: baselines' labels, set apart by their italics too
ROW_INCHES = 0.26  # a 9-point number and its cell's margin
BUDGET_INCHES = 0.8
FONT = 9


def draw_heatmaps(plt, panels: list[Panel]):
    """One figure, the panels stacked top to bottom (each its own setting and row count)."""
    heights = [ROW_INCHES * len(p.rows) + 1.0 for p in panels]
    longest = max(len(p.label(r)) for p in panels for r in p.rows)
    budgets = max(len(p.budgets) for p in panels)
    width = 0.3 + 0.068 * longest + BUDGET_INCHES * budgets
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(width, 4.5), sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights}, layout="constrained")
    for ax, panel in zip(axes[:, 0], panels):
        draw_heatmap(ax, panel)
    return fig


def draw_heatmap(ax, panel: Panel) -> None:
    import matplotlib
    import numpy as np

    scores = np.array([[np.nan if s is None else s for s in row] for row in panel.matrix()], dtype=float)
    cmap = matplotlib.colormaps[CMAP].with_extremes(bad=NO_DATA)
    image = ax.imshow(np.ma.masked_invalid(scores), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")
    for i, row in enumerate(panel.rows):
        for j, text in enumerate(row.texts()):
            value = scores[i, j]
            ax.text(j, i, text, ha="center", va="center", fontsize=FONT,
                    color="#555555" if np.isnan(value) else _ink(image.cmap(image.norm(value))))

    ax.set_xticks(range(len(panel.budgets)), panel.budgets, fontsize=FONT)
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    percent = all(b.endswith("%") for b in panel.budgets)
    ax.set_xlabel("KV budget (share of entries kept)" if percent else "KV budget", fontsize=FONT)
    ax.set_yticks(range(len(panel.rows)), [panel.label(r) for r in panel.rows], fontsize=FONT)
    for label, row in zip(ax.get_yticklabels(), panel.rows):
        if row.reference:
            label.set_fontweight("bold")
        elif row.baseline:
            label.set_fontstyle("italic")
            label.set_color(PRESS_COLOUR)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    # White rules between the cells; a thicker one under the reference rows.
    ax.set_xticks(np.arange(-0.5, len(panel.budgets), 1.0), minor=True)
    ax.set_yticks(np.arange(-0.5, len(panel.rows), 1.0), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)
    if 0 < panel.references < len(panel.rows):
        ax.axhline(panel.references - 0.5, color="white", linewidth=4)
    ax.set_title(f"{panel.setting.title()} — mean score", fontsize=FONT + 1, loc="left", pad=8)
    notes = []
    baselines = list(dict.fromkeys(runtime_of(r.policy) for r in panel.rows if r.baseline and not r.reference))
    if baselines:
        notes.append(f"italic: {', '.join(baselines)}'s presses, each under its kvx namesake")
    if any(r.samples() < panel.samples for r in panel.rows):
        notes.append(f"n=: a row with fewer than the {panel.samples} samples of the others")
    if notes:
        ax.text(0.0, -0.01, "\n".join(notes), transform=ax.transAxes, fontsize=FONT - 1, color="#444444",
                va="top")


def _ink(rgba) -> str:
    """Black on the light end of the map, white on the dark end (relative luminance, sRGB weights)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"

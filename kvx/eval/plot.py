"""`kvx eval --plot`: the results as a picture, one panel per setting, written whole or not at all.

Two styles: `heatmap` (every policy a row, every budget a column, the score printed in each cell: the
whole table at a glance) and `lines` (score against budget for the best few policies and the full cache,
as papers and kvpress's leaderboard show them). matplotlib is an optional dependency (`kvx[plot]`): it
is imported here, lazily, and its absence is a one-line error before any work.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kvx.errors import KvxError

STYLES = ("heatmap", "lines")
MISSING = "--plot needs matplotlib, which is not installed: pip install 'kvx[plot]'"


def check_style(style: str) -> str:
    if style not in STYLES:
        raise KvxError(f"--plot-style: unknown style {style!r}; choose {' or '.join(STYLES)}")
    return style


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only: no display is needed or opened)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KvxError(MISSING) from None
    return plt


def check_plot_path(path: str | Path) -> None:
    """The image format follows the file name; one matplotlib cannot write fails now, not after a run."""
    pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = _format(Path(path))
    known = FigureCanvasBase.get_supported_filetypes()
    if fmt not in known:
        raise KvxError(f"--plot {path}: cannot draw a .{fmt} image; name a .png, .svg or .pdf file")


def plot_results(rows: list[dict], path: str | Path, style: str = "heatmap") -> Path:
    """Draw the rows (one panel per setting) in `style` to `path`; returns the path."""
    from kvx.eval.panel import build_panels

    check_style(style)
    plt = pyplot()
    panels = build_panels(rows)
    if not panels:
        raise KvxError("nothing to plot: there are no results")
    if style == "heatmap":
        from kvx.eval.plot_heatmap import draw_heatmaps

        fig = draw_heatmaps(plt, panels)
    else:
        from kvx.eval.plot_lines import draw_lines

        fig = draw_lines(plt, panels)
    try:
        return save(fig, Path(path))
    finally:
        plt.close(fig)


def save(fig, path: Path) -> Path:
    """Write to a temporary neighbour, then rename it over `path`: an interrupted or failed save leaves
    the old image (or none), never a half-written one."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise KvxError(f"cannot write the plot {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format=_format(path), dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise KvxError(f"cannot write the plot {path}: {exc.strerror or exc}") from None
    except BaseException:
        _remove(tmp)
        raise
    return path


def _format(path: Path) -> str:
    return path.suffix[1:].lower() or "png"


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

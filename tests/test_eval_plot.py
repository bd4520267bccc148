"""`kvx eval --plot`: the heatmap and the line chart, checked through the data handed to matplotlib.

No model anywhere: the pictures are drawn from a handmade results file, as `--summary-only` does.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("matplotlib")

from kvx.eval import plot as plot_module
from kvx.eval.panel import build_panels, twin_of
from kvx.eval.plot import plot_results
from kvx.eval.report import render_markdown, summarize

FULL_BYTES = 1000


def row(policy, budget, score, seed=0, held=None, mode="agnostic", task="passkey", error=False):
    """A results row as `kvx eval` writes it (the fields a summary or a picture reads)."""
    kept = FULL_BYTES if budget == "100%" else FULL_BYTES * float(budget.rstrip("%")) / 100
    r = {"task": task, "context": 4096, "haystack": "noise", "seed": seed, "depth": 0.5, "mode": mode,
         "model": "tiny", "policy": policy, "budget": budget, "score": None if error else score,
         "kv_bytes_held": kept if held is None else held, "kv_bytes_full": FULL_BYTES}
    if error:
        r["error"] = "RuntimeError: x"
    return r


def sweep(policy, scores_by_budget, seeds=2, mode="agnostic"):
    """Rows for a policy: scores_by_budget maps a budget to the score of each seed."""
    return [row(policy, b, s, seed=i, mode=mode) for b, scores in scores_by_budget.items()
            for i, s in enumerate(scores[:seeds])]


ROWS = (
    sweep("full", {"100%": [1, 1]})
    + sweep("snapkv", {"5%": [0, 1], "10%": [1, 1]})
    + sweep("tova", {"5%": [0, 0], "10%": [0, 1]})
    + sweep("kvzip", {"5%": [1, 1], "10%": [1, 1]})
    + sweep("kvpress:full", {"100%": [1, 1]})
    + sweep("kvpress:snapkv", {"5%": [0, 0], "10%": [1, 0]})
    + sweep("kvpress:knorm", {"5%": [0, 0]})  # no kvx twin, and no 10% rows: a missing cell
    + [row("kvpress:tova", "5%", None, seed=i, error=True) for i in range(2)]  # every row failed
    + sweep("kvpress:tova", {"10%": [1, 1]})
)


def markdown_table(rows) -> dict[str, list[str]]:
    """The `--markdown` summary's cells, policy -> one text per budget (bold marks dropped)."""
    table = {}
    for line in render_markdown(summarize(rows)).splitlines():
        if line.startswith("| ") and not line.startswith(("| policy", "| K+V")):
            name, *cells = [c.strip().replace("**", "") for c in line.strip("|").split("|")]
            table[name.removesuffix(" (reference)")] = cells
    return table


@pytest.fixture
def drawn(monkeypatch):
    """plot_results that also hands back the figure it saved (closed afterwards, still inspectable)."""
    figures = []
    original = plot_module.save

    def keep(fig, path):
        figures.append(fig)
        return original(fig, path)

    monkeypatch.setattr(plot_module, "save", keep)

    def draw(rows, path, style="heatmap"):
        plot_results(rows, path, style)
        return figures[-1]

    return draw


def cell_texts(ax) -> list[str]:
    """The numbers printed in the heatmap's cells, row by row (the caption under the axes left out)."""
    return [t.get_text() for t in ax.texts if t.get_transform() == ax.transData]


def test_heatmap_has_a_row_per_policy_and_the_tables_numbers(tmp_path, drawn):
    fig = drawn(ROWS, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    (ax,) = fig.axes
    labels = [t.get_text().split("  n=")[0].removesuffix(" (reference)") for t in ax.get_yticklabels()]
    assert sorted(labels) == sorted({r["policy"] for r in ROWS})  # every policy once, nothing else
    assert [t.get_text() for t in ax.get_xticklabels()] == ["5%", "10%"]
    table = markdown_table(ROWS)
    texts = cell_texts(ax)
    assert len(texts) == len(labels) * 2
    for i, policy in enumerate(labels):
        assert [t.replace("–", "-") for t in texts[2 * i:2 * i + 2]] == table[policy], policy
    # The colours are the same numbers: the image array holds the scores, missing cells masked.
    image = ax.images[0].get_array()
    panel = build_panels(ROWS)[0]
    for i, scores in enumerate(panel.matrix()):
        for j, s in enumerate(scores):
            assert bool(image.mask[i, j]) if s is None else image[i, j] == pytest.approx(s)


def test_heatmap_order_references_then_mean_score_presses_under_their_twins():
    (panel,) = build_panels(ROWS)
    order = [r.policy for r in panel.rows]
    assert order[:2] == ["full", "kvpress:full"] and panel.references == 2
    # kvzip (mean 1.0), snapkv (0.75) with its press, tova (0.25) with its press, then knorm (no twin, 0).
    assert order[2:] == ["kvzip", "snapkv", "kvpress:snapkv", "tova", "kvpress:tova", "kvpress:knorm"]
    means = {r.policy: r.mean() for r in panel.rows}
    assert means["snapkv"] == 0.75 and means["kvpress:tova"] == 1.0  # its failed 5% cell is not a zero
    assert [r.texts() for r in panel.rows if r.policy == "kvpress:tova"] == [["error", "1.00"]]
    assert [r.texts() for r in panel.rows if r.policy == "kvpress:knorm"] == [["0.00", "–"]]
    assert {r.policy for r in panel.rows if r.baseline} == {p for p in order if p.startswith("kvpress:")}
    assert twin_of("kvpress:snapkv") == "snapkv"


def test_heatmap_marks_the_presses(tmp_path, drawn):
    (ax,) = drawn(ROWS, tmp_path / "h.png").axes
    styles = {t.get_text(): t.get_fontstyle() for t in ax.get_yticklabels()}
    assert styles["kvpress:snapkv"] == "italic" and styles["snapkv"] == "normal"
    assert any("kvpress's presses" in t.get_text() for t in ax.texts)


def test_a_row_with_fewer_samples_says_how_many(tmp_path, drawn):
    rows = ROWS + sweep("h2o", {"5%": [1], "10%": [0]}, seeds=1)
    (ax,) = drawn(rows, tmp_path / "h.png").axes
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "h2o  n=1" in labels and "snapkv" in labels  # the others have the panel's 2 samples
    assert any("fewer than the 2 samples" in t.get_text() for t in ax.texts)


def test_one_panel_per_mode(tmp_path, drawn):
    rows = ROWS + [dict(r, mode="aware") for r in sweep("full", {"100%": [1]}) + sweep("snapkv", {"5%": [1]})]
    fig = drawn(rows, tmp_path / "h.png")
    assert [ax.get_title(loc="left").split(" — ")[0] for ax in fig.axes] == [
        "passkey · 4096 tokens · noise · agnostic", "passkey · 4096 tokens · noise · aware"]
    assert len(fig.axes[1].get_yticklabels()) == 2


def test_lines_draw_the_best_policies_and_the_full_cache(tmp_path, drawn):
    many = ROWS + [r for k in range(8) for r in sweep(f"p{k}", {"5%": [k / 10] * 2, "10%": [k / 10] * 2})]
    (ax,) = drawn(many, tmp_path / "l.png", "lines").axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    drawn_policies = [name for name in lines if name != "full (reference)"]
    assert "full (reference)" in lines and lines["full (reference)"].get_linestyle() == "--"
    # The six best mean scores: kvzip 1.0, kvpress:tova 1.0 (its failed cell left out; the tie keeps the
    # heatmap's order), snapkv 0.75, then p7, p6, p5 (0.7, 0.6, 0.5).
    assert drawn_policies == ["kvzip", "kvpress:tova", "snapkv", "p7", "p6", "p5"]
    assert len({lines[n].get_color() for n in drawn_policies}) == 6
    assert len({lines[n].get_marker() for n in drawn_policies}) == 6
    assert lines["kvpress:tova"].get_linestyle() == "--" and lines["kvzip"].get_linestyle() == "-"
    assert list(lines["snapkv"].get_ydata()) == [0.5, 1.0]
    assert list(lines["kvpress:tova"].get_xdata()) == [10.0]  # the error cell is no point


def test_a_failed_save_leaves_no_file(tmp_path, monkeypatch):
    from kvx.errors import KvxError

    def broken(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(KvxError, match="No space left"):
        plot_results(ROWS, tmp_path / "h.png")
    assert list(tmp_path.iterdir()) == []


def test_summary_only_draws_without_a_model(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    import kvx.options
    from kvx.commands.eval import eval_command

    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    monkeypatch.setattr(kvx.options, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded a model")))
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("other")(lambda: None)
    for style in ("heatmap", "lines"):
        image = tmp_path / f"{style}.svg"
        result = CliRunner().invoke(app, ["eval", "--out", str(results), "--summary-only", "--markdown",
                                          "--plot", str(image), "--plot-style", style])
        assert result.exit_code == 0, result.output
        assert image.read_text().lstrip().startswith("<?xml") and "<svg" in image.read_text()
        assert "| snapkv | 0.50 | **1.00** |" in result.output


def test_score_texts_round_like_the_table():
    rows = sweep("full", {"100%": [1, 1, 1]}, seeds=3) + sweep("snapkv", {"5%": [1, 0, 0]}, seeds=3)
    (panel,) = build_panels(rows)
    snap = next(r for r in panel.rows if r.policy == "snapkv")
    assert snap.texts() == ["0.33"] == markdown_table(rows)["snapkv"]
    assert math.isclose(snap.mean(), 1 / 3)


def test_without_matplotlib_the_command_stops_before_any_work(tmp_path, monkeypatch):
    import sys

    import typer
    from typer.testing import CliRunner

    from kvx.commands.eval import eval_command
    from kvx.errors import KvxError

    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["eval", "--out", str(results), "--summary-only", "--markdown",
                                      "--plot", str(tmp_path / "p.png")])
    assert isinstance(result.exception, KvxError) and "pip install 'kvx[plot]'" in str(result.exception)
    assert result.output == "" and sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]

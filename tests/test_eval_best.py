"""`kvx eval --best`: the best policy per budget, computed from the rows of a small handmade results file."""

from __future__ import annotations

import json

import pytest

from kvx.errors import KvxError
from kvx.eval.best import best_tables
from kvx.eval.best_view import render_best_markdown, size_text
from kvx.eval.results import read_results

MiB = 2 ** 20


def row(policy, budget, score, seed, mode="agnostic", task="passkey", context=4096, error=False):
    full = 100 * MiB
    held = full if budget == "100%" else full * float(budget.rstrip("%")) / 100
    if policy.startswith("kvpress:ada"):
        held = full  # kvpress's AdaKV masks: its cache holds everything
    r = {"task": task, "context": context, "haystack": "noise", "seed": seed, "depth": 0.0, "mode": mode,
         "model": "tiny", "policy": policy, "budget": budget, "score": None if error else score,
         "kv_bytes_held": held, "kv_bytes_full": full}
    if error:
        r["error"] = "RuntimeError: x"
    return r


def rows_for(policy, budget, scores, **kw):
    return [row(policy, budget, s, seed, **kw) for seed, s in enumerate(scores)]


HAND = (
    rows_for("full", "100%", [1, 1, 1, 0])
    + rows_for("snapkv", "5%", [1, 0, 0, 0]) + rows_for("snapkv", "10%", [1, 1, 0, 0])
    + rows_for("kvzip", "5%", [1, 1, 1, 0]) + rows_for("kvzip", "10%", [1, 1, 0, 0])
    + rows_for("tova", "5%", [0, 0, 0, 0]) + rows_for("tova", "10%", [1, 1, 0, 0])
    + rows_for("kvpress:full", "100%", [1, 1, 1, 0])
    + rows_for("kvpress:ada-snapkv", "5%", [1, 0, 0, 0]) + rows_for("kvpress:ada-snapkv", "10%", [1, 0, 0, 0])
    + rows_for("kvpress:snapkv", "5%", [1, 0, 0, 0])  # ties ada-snapkv at 5% with a smaller cache
    + rows_for("kvpress:snapkv", "10%", [0, 0], error=True)  # failed: not a candidate
    + rows_for("kvpress:kvzip", "10%", [1, 1])  # fewer samples than the setting's cells
    # another mode, another setting: a table of its own, after agnostic
    + rows_for("full", "100%", [1, 1], mode="aware") + rows_for("snapkv", "5%", [1, 1], mode="aware")
)


def test_best_policy_per_budget_from_the_rows():
    agnostic, aware = best_tables(HAND)
    assert (agnostic.setting.mode, aware.setting.mode) == ("agnostic", "aware")
    assert agnostic.runtimes == ["kvx", "kvpress"] and aware.runtimes == ["kvx"]
    assert agnostic.full_score == 0.75 and agnostic.samples == 4
    five, ten = agnostic.rows
    assert (five.budget, ten.budget) == ("5%", "10%")
    assert five.picks["kvx"].policy == "kvzip" and five.picks["kvx"].score == 0.75
    assert five.picks["kvx"].kv_fraction == pytest.approx(0.05) and five.picks["kvx"].kv_bytes == pytest.approx(5 * MiB)
    # A tie at 10% (kvzip, snapkv, tova all 0.50): the policy best over every budget is named (kvzip,
    # as at 5%, not whichever came first), the others counted.
    assert ten.picks["kvx"].policy == "kvzip" and ten.picks["kvx"].score == 0.5 and ten.picks["kvx"].tied == 2
    # kvpress at 5%: snapkv and ada-snapkv tie at 0.25; snapkv's cache is smaller, so it is named.
    assert five.picks["kvpress"].policy == "kvpress:snapkv" and five.picks["kvpress"].tied == 1
    # kvpress at 10%: snapkv failed; kvzip's 2 samples (1.00) beat ada-snapkv's 4 (0.25).
    assert ten.picks["kvpress"].policy == "kvpress:kvzip" and ten.picks["kvpress"].samples == 2
    assert aware.rows[0].picks["kvx"].policy == "snapkv" and aware.rows[0].picks["kvx"].score == 1.0


def test_best_markdown_one_table_per_mode():
    md = render_best_markdown(best_tables(HAND)).splitlines()
    assert md[0].startswith("**agnostic**: ")
    assert md[2] == ("| setting | full cache | budget | kvx's best | score | K+V held | "
                     "kvpress's best | score | K+V held |")
    assert md[4] == ("| passkey, 4k, noise | 0.75 | 5% | kvzip | 0.75 | 5.0% (5.0 MiB) | "
                     "kvpress:snapkv (+1 tied) | 0.25 | 5.0% (5.0 MiB) |")
    assert md[5] == ("|  |  | 10% | kvzip (+2 tied) | 0.50 | 10.0% (10.0 MiB) | "
                     "kvpress:kvzip | 1.00 (n=2) | 10.0% (10.0 MiB) |")
    aware = md.index("**aware**: the whole prompt compressed, RULER's answer prefix included")
    assert md[aware + 2] == "| setting | full cache | budget | kvx's best | score | K+V held |"
    assert md[aware + 4] == "| passkey, 4k, noise | 1.00 | 5% | snapkv | 1.00 | 5.0% (5.0 MiB) |"


def test_a_setting_per_context_and_task_inside_a_mode():
    rows = HAND + rows_for("full", "100%", [1], context=8000) + rows_for("snapkv", "5%", [0], context=8000)
    tables = best_tables(rows)
    assert [(t.setting.mode, t.setting.context) for t in tables] == [("agnostic", 4096), ("agnostic", 8000),
                                                                       ("aware", 4096)]
    md = render_best_markdown(tables)
    assert md.count("**agnostic**") == 1 and "| passkey, 8000, noise | 1.00 | 5% | snapkv | 0.00 |" in md


def test_sizes():
    assert size_text(5 * MiB) == "5.0 MiB" and size_text(3 * 2 ** 30) == "3.0 GiB" and size_text(2048) == "2.0 KiB"


def test_several_files_read_together_later_rows_win(tmp_path):
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    old.write_text("".join(json.dumps(r) + "\n" for r in HAND))
    newer = rows_for("full", "100%", [1, 1, 1, 1]) + rows_for("tova", "5%", [1, 1, 1, 1])
    new.write_text("".join(json.dumps(r) + "\n" for r in newer))
    rows, replaced = read_results([old, new])
    assert replaced == 8 and len(rows) == len(HAND)
    assert [r["score"] for r in rows if r["policy"] == "tova" and r["budget"] == "5%"] == [1, 1, 1, 1]
    # The policies keep the order of the first file (a replaced row stays where it was).
    assert list(dict.fromkeys(r["policy"] for r in rows))[:4] == ["full", "snapkv", "kvzip", "tova"]
    assert best_tables(rows)[0].rows[0].picks["kvx"].policy == "tova"
    with pytest.raises(KvxError, match="no such results file"):
        read_results([old, tmp_path / "missing.jsonl"])


def test_best_through_the_command(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    import kvx.options
    from kvx.commands.eval import eval_command

    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in HAND))
    monkeypatch.setattr(kvx.options, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded a model")))
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("other")(lambda: None)
    md = CliRunner().invoke(app, ["eval", "--out", str(results), "--summary-only", "--best", "--markdown"])
    assert md.exit_code == 0, md.output
    assert md.output.strip() == render_best_markdown(best_tables(HAND)).strip()
    as_json = CliRunner().invoke(app, ["eval", "--out", str(results), "--summary-only", "--best", "--json"])
    doc = json.loads(as_json.output)
    assert doc["rows"] == len(HAND) and doc["out"] == str(results)
    first = doc["best"][0]
    assert first["mode"] == "agnostic" and first["full_score"] == 0.75
    assert first["budgets"][0]["kvx"] == {"policy": "kvzip", "score": 0.75, "kv_fraction": 0.05,
                                          "kv_bytes": 5 * MiB, "samples": 4, "tied": 0}


def test_a_full_tie_names_the_policy_with_default_options():
    rows = (rows_for("full", "100%", [1, 1]) + rows_for("kvzip[keep_prefix=false]", "5%", [1, 1])
            + rows_for("kvzip", "5%", [1, 1]))
    (table,) = best_tables(rows)
    assert table.rows[0].picks["kvx"].policy == "kvzip" and table.rows[0].picks["kvx"].tied == 1

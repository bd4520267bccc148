"""The summary line and --json name what they count: entries kept against the full cache of the same
tokens, bytes in use against bytes allocated, the decode headroom as headroom. A budget is never ignored."""

from __future__ import annotations

import json
import re

import pytest

from checkpoints import make_model_folder
from kvx.result_view import KvFigures, result_json, summary_line
from kvx.runtime.engine.state import GenerationResult, Timings

PROMPT = "Alice keeps a red umbrella by the door. Bob has a green one. " * 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("model"))


def _result(**kv) -> GenerationResult:
    return GenerationResult(text="", token_ids=[], prompt_tokens=90, generated_tokens=10, finish_reason="eos",
                            timings=Timings(prefill_s=1.0, decode_s=1.0), policy="snapkv", budget="10%", **kv)


def test_figures_of_a_plain_question():
    # The case the issue quotes: a full cache with a large decode headroom reads as headroom, not as 666%.
    r = _result(kv_entries_kept=400, kv_entries_full=400, kv_bytes_full=400 * 128, kv_bytes_held=2666 * 128,
                kv_bytes_peak=2666 * 128)
    kv = KvFigures.of(r)
    assert (kv.bytes_in_use, kv.bytes_headroom, kv.bytes_allocated) == (400 * 128, 2266 * 128, 2666 * 128)
    line = summary_line(r)
    assert "KV kept 400 of 400 entries (100.0%): 50.00 KiB of 50.00 KiB" in line
    assert "allocated 333.25 KiB (283.25 KiB of it decode headroom)" in line
    assert "%" not in line.split("KV kept")[1].replace("(100.0%)", "")  # no ratio of allocated to full


def test_json_fields_add_up():
    r = _result(kv_entries_kept=40, kv_entries_full=400, kv_bytes_full=400 * 128, kv_bytes_held=56 * 128,
                kv_bytes_peak=400 * 128)
    d = result_json(r, question="q")
    assert d["kv_kept_fraction"] == 0.1 and d["kv_bytes_in_use"] == 40 * 128 and d["kv_bytes_full"] == 400 * 128
    assert d["kv_bytes_allocated"] == d["kv_bytes_in_use"] + d["kv_bytes_headroom"] == 56 * 128
    assert d["kv_bytes_peak"] == 400 * 128 and d["question"] == "q" and "kv_bytes_held" not in d


def test_budget_alone_picks_laprox_and_says_so(cli, model_dir):
    code, out, err = cli("generate", "--model", model_dir, "-n", "3", "--budget", "30%", PROMPT)
    assert code == 0, err
    assert "policy laprox @ 30%" in err
    code, out, _ = cli("generate", "--model", model_dir, "-n", "3", "--budget", "30%", "--json", "--quiet", PROMPT)
    d = json.loads(out)
    assert d["policy"] == "laprox" and d["budget"] == "30%" and d["kv_kept_fraction"] < 0.5


def test_summary_agrees_with_json(cli, model_dir):
    args = ("generate", "--model", model_dir, "-n", "4", "--policy", "snapkv", "--budget", "25%", PROMPT)
    _, _, err = cli(*args)
    _, out, _ = cli(*args, "--json", "--quiet")
    d = json.loads(out)
    m = re.search(r"KV kept ([\d,]+) of ([\d,]+) entries", err)
    assert m and (int(m[1].replace(",", "")), int(m[2].replace(",", ""))) == (d["kv_entries_kept"],
                                                                                 d["kv_entries_full"])
    assert d["kv_entries_kept"] < 0.5 * d["kv_entries_full"]
    assert d["kv_bytes_allocated"] == d["kv_bytes_in_use"] + d["kv_bytes_headroom"]


def test_the_short_prompt_note_counts_kept_tokens_per_kv_head():
    from types import SimpleNamespace

    from kvx.options import FEW_KEPT_TOKENS, short_prompt_note
    from kvx.policies import build_policy, parse_budget

    config = SimpleNamespace(num_layers=4, num_kv_heads=2)

    def note(policy, budget, n):
        engine = SimpleNamespace(policy=policy and build_policy(policy), budget=budget and parse_budget(budget),
                                 config=config)
        return short_prompt_note(engine, n)

    assert FEW_KEPT_TOKENS == 32
    assert "about 30 tokens per kv head" in note("snapkv", "5%", 600)  # 5% of 600 = 30 < 32
    assert note("snapkv", "5%", 640) is None  # 32: enough
    assert "about 31 tokens" in note("h2o", "31", 5000)
    assert note("h2o", "32", 5000) is None
    assert note("snapkv", "31", 20) is None  # the budget keeps the whole prompt: nothing is lost
    assert note(None, None, 10) is None and note("full", None, 10) is None

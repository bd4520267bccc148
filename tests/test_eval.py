"""`kvx eval`: shared prefill, fidelity metrics, resumable JSONL, summary, plot, kvpress adapter, end to end."""

from __future__ import annotations

import json
import os
import sys
import zlib

import pytest
import torch

from checkpoints import make_checkpoint
from kvx.errors import KvxError
from kvx.eval import report
from kvx.eval.fidelity import kl_divergence, measure_fidelity
from kvx.eval.kvpress_baseline import KvpressBaseline, compression_ratio, require_kvpress
from kvx.eval.plot import plot_results
from kvx.eval.prefill import SharedPrefill
from kvx.runtime.engine.batch_engine import BatchEngine
from kvx.runtime.cache.pool import BlockPool
from kvx.runtime.engine.sequence import GenerationRequest
from kvx.eval.results import KEY_FIELDS, ResultsFile, row_key
from kvx.eval.runner import EvalConfig, run_eval
from kvx.models.transformer import Transformer
from kvx.policies import build_policy, parse_budget
from kvx.runtime.engine.model_runner import ModelRunner


class WordTokenizer:
    """One token per whitespace-separated word (hashed into a tiny vocabulary); no chat template."""

    eos_token_ids: list[int] = []
    has_chat_template = False

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [3 + zlib.crc32(w.encode()) % 120 for w in text.split()]

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_checkpoint("qwen2", tmp_path_factory.mktemp("ck"))
    return ModelRunner(Transformer.from_pretrained(path), WordTokenizer())


def _ids(n, seed=1):
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _kept_positions(req):
    return [[lc.head_positions(g).tolist() for g in range(len(lc.tables))] for lc in req.cache.layers]


# -- one prefill for many policies ---------------------------------------------------------------------

def _pool(engine, blocks=2048):
    cfg = engine.config
    return BlockPool(blocks, 16, cfg.head_dim, engine.dtype, engine.device)


def _decode(engine, req, logits, n):
    """n greedy tokens of a prefilled, compressed request, decoded by the engine in its own pool."""
    batch = BatchEngine(engine, pool=req.cache.pool)
    seq = batch.adopt(req, GenerationRequest(prompt_ids=[0] * req.position, max_tokens=n, stop_at_eos=False),
                      logits)
    batch.run()
    return seq.results[0].token_ids


def test_shared_prefill_equals_each_policys_own_prefill(tiny):
    """Forks of one prefill keep exactly what each policy keeps after its own prefill, and decode alike."""
    ids = _ids(96)
    names = ["snapkv", "ada-snapkv", "pyramidkv", "ahakv", "laprox", "h2o", "tova", "criticalkv",
             "expected-attention", "knorm", "streaming"]
    # Different windows and sg_budgets (AhaKV: per budget) must not leak into each other.
    pairs = [(build_policy(n), parse_budget(b)) for n in names for b in ("15%", "40%")]
    pairs.append((build_policy("snapkv", args={"window": "8"}), parse_budget("15%")))
    shared = SharedPrefill(tiny, ids, pairs)
    for policy, budget in pairs:
        forked = shared.fork(policy, budget)
        tiny.compress(forked, headroom=2, pool=_pool(tiny))
        own = tiny.new_request(_pool(tiny), capacity=len(ids), policy=policy, budget=budget)
        logits = tiny.prefill(own, ids)
        tiny.compress(own, headroom=2)
        assert torch.equal(logits, shared.logits)
        assert _kept_positions(forked) == _kept_positions(own), (policy.name, budget)
        a = _decode(tiny, forked, logits, 6)
        b = _decode(tiny, own, logits, 6)
        assert a == b, (policy.name, budget)
    # The shared prefill's own cache is untouched by its forks' compressions.
    assert shared.base.cache.lengths() == [[len(ids)] * tiny.config.num_kv_heads] * tiny.config.num_layers


def test_an_attend_wrap_applies_to_its_own_forward_only(tiny):
    """The explicit hook that replaced patching the engine: wrap(attend) wraps one forward pass's attend."""
    req = tiny.new_request(_pool(tiny), capacity=40)
    seen = []

    def wrap(attend):
        def inner(layer, *args):
            seen.append(layer)
            return attend(layer, *args)
        return inner

    tiny.forward(req, _ids(20), wrap=wrap)
    assert seen == list(range(tiny.config.num_layers))
    tiny.forward(req, _ids(5, seed=3))
    assert seen == list(range(tiny.config.num_layers))


# -- fidelity ----------------------------------------------------------------------------------------

def test_kl_divergence_matches_torch():
    g = torch.Generator().manual_seed(3)
    p, q = torch.randn(50, generator=g) * 3, torch.randn(50, generator=g) * 3
    want = torch.nn.functional.kl_div(torch.log_softmax(q.double(), -1), torch.log_softmax(p.double(), -1),
                                      log_target=True, reduction="sum")
    assert kl_divergence(p, q) == pytest.approx(float(want), rel=1e-9)
    assert kl_divergence(p, p) == 0.0


def test_fidelity_full_against_full_is_exact(tiny):
    ids, cont = _ids(80), _ids(10, seed=2)
    result = measure_fidelity(tiny, ids, cont, build_policy("full"), None)
    assert result.kl == [0.0] * 10 and all(result.top1)
    assert result.top1_agreement == 1.0 and result.layer_rel_error == [0.0, 0.0]
    # A budget that keeps everything is the full cache too.
    same = measure_fidelity(tiny, ids, cont, build_policy("snapkv"), parse_budget("100%"))
    assert same.mean_kl == 0.0 and same.layer_rel_error == [0.0, 0.0]


def test_fidelity_of_a_compressed_cache(tiny):
    ids, cont = _ids(80), _ids(10, seed=2)
    result = measure_fidelity(tiny, ids, cont, build_policy("snapkv"), parse_budget("20%"))
    assert len(result.kl) == 10 and len(result.layer_rel_error) == 2
    assert result.mean_kl > 1e-4 and all(k >= 0 for k in result.kl)
    assert all(0 < e < 10 for e in result.layer_rel_error)
    assert 0.0 <= result.top1_agreement <= 1.0

    # Layer 0 sees identical inputs in both runs, so its isolated error (shadow cache fed the full run's
    # q, k, v) must equal the error of the compressed run's own layer-0 output against the full run's.
    shared = SharedPrefill(tiny, ids, [(build_policy("snapkv"), parse_budget("20%"))])
    full, comp = shared.fork(), shared.fork(build_policy("snapkv"), parse_budget("20%"))
    tiny.compress(full, headroom=len(cont), pool=_pool(tiny))
    tiny.compress(comp, headroom=len(cont), pool=_pool(tiny))
    outs = {id(full): [], id(comp): []}

    def record(req):
        def wrap(attend):
            def inner(layer, q, k, v, p, qp):
                o = attend(layer, q, k, v, p, qp)
                if layer == 0:
                    outs[id(req)].append(o.clone())
                return o
            return inner
        return wrap

    for tok in cont:
        tiny.forward(full, [tok], wrap=record(full))
        tiny.forward(comp, [tok], wrap=record(comp))
    of, oc = torch.cat(outs[id(full)], 1), torch.cat(outs[id(comp)], 1)
    want = float((oc - of).norm() / of.norm())
    assert result.layer_rel_error[0] == pytest.approx(want, rel=1e-4)


# -- the runner: rows, resume ---------------------------------------------------------------------------

def _config(**kw):
    base = dict(tasks=["passkey"], context=120, policies=["snapkv"], budgets=["50%"], samples=2, max_tokens=4,
                model="tiny", dtype="float32")
    base.update(kw)
    return EvalConfig(**base)


def _count_prefills(monkeypatch, engine):
    calls = []
    original = engine.prefill
    monkeypatch.setattr(engine, "prefill", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_rows_are_well_formed(tiny, tmp_path):
    out = tmp_path / "r.jsonl"
    rows = run_eval(tiny, _config(budgets=["50%", "25%"]), ResultsFile(out))
    lines = out.read_text().splitlines()
    assert len(lines) == len(rows) == 2 * 3
    parsed = [json.loads(line) for line in lines]
    assert len({row_key(r) for r in parsed}) == 6
    for r in parsed:
        for key in KEY_FIELDS + ("score", "prediction", "answers", "kv_bytes_held", "kv_bytes_full", "timings"):
            assert key in r, key
        assert r["task"] == "passkey" and r["mode"] == "agnostic" and r["context"] == 120
        assert 0.0 <= r["score"] <= 1.0 and isinstance(r["prediction"], str) and r["answers"][0].isdigit()
        assert r["generated_tokens"] == 4 and set(r["timings"]) >= {"prefill_s", "decode_s", "wall_s"}
        share = r["kv_bytes_held"] / r["kv_bytes_full"]
        want = {"full": 1.0, "50%": 0.5, "25%": 0.25}["full" if r["policy"] == "full" else r["budget"]]
        assert share == pytest.approx(want, abs=0.02)
    assert {r["depth"] for r in parsed} == {0.0, 0.25}  # samples cycle through the depth sweep


def test_resume_skips_finished_rows(tiny, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    config = _config()
    first = run_eval(tiny, config, ResultsFile(out))
    text = out.read_text()
    assert len(first) == 4

    prefills = _count_prefills(monkeypatch, tiny)
    started = []
    second = run_eval(tiny, _config(), ResultsFile(out), on_start=started.append)
    assert prefills == [] and started == [0] and out.read_text() == text
    assert sorted(map(row_key, second)) == sorted(map(row_key, first))

    # Drop one row: a rerun does that row only, with one prefill, and appends it.
    lines = text.splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n")
    third = run_eval(tiny, _config(), ResultsFile(out), on_start=started.append)
    assert started[-1] == 1 and len(prefills) == 1 and len(third) == 4
    assert json.loads(out.read_text().splitlines()[-1])["prediction"] == json.loads(lines[-1])["prediction"]


def test_policy_options_in_the_policy_list(tiny, tmp_path):
    config = _config(samples=1, policies=["tova", "tova[heads=layer]", "snapkv[window=4]"])
    rows = run_eval(tiny, config, ResultsFile(tmp_path / "o.jsonl"))
    assert [r["policy"] for r in rows] == ["full", "tova", "tova[heads=layer]", "snapkv[window=4]"]
    with pytest.raises(KvxError, match="unknown option"):
        run_eval(tiny, _config(policies=["tova[kernel=3]"]), ResultsFile(tmp_path / "p.jsonl"))


def test_aware_mode_and_fidelity_rows(tiny, tmp_path):
    rows = run_eval(tiny, _config(mode="aware", samples=1, fidelity=True), ResultsFile(tmp_path / "a.jsonl"))
    by_policy = {r["policy"]: r for r in rows}
    assert by_policy["full"]["prompt_tokens"] == by_policy["snapkv"]["prompt_tokens"]
    assert "fidelity" not in by_policy["full"]
    fid = by_policy["snapkv"]["fidelity"]
    assert fid["kl"] >= 0 and 0 <= fid["top1"] <= 1 and len(fid["layer_rel_error"]) == 2


def test_results_file_refuses_other_models_and_bad_lines(tiny, tmp_path):
    out = tmp_path / "r.jsonl"
    run_eval(tiny, _config(samples=1), ResultsFile(out))
    with pytest.raises(KvxError, match="model"):
        run_eval(tiny, _config(samples=1, model="other"), ResultsFile(out))
    out.write_text(out.read_text() + '{"task": "passkey", "trunc\n')
    with pytest.raises(KvxError, match="line 3"):
        ResultsFile(out)


def test_a_second_writer_is_refused(tmp_path):
    out = tmp_path / "r.jsonl"
    first = ResultsFile(out)
    first.lock()
    first.append({"task": "passkey", "context": 1, "haystack": "noise", "seed": 0, "depth": 0.5,
                  "mode": "agnostic", "policy": "full", "budget": "100%", "score": 1.0})
    with pytest.raises(KvxError, match="another kvx eval is writing"):
        ResultsFile(out).lock()
    # In another process too (flock is per open file, so this is the real case).
    import subprocess

    code = ("import sys; from kvx.eval.results import ResultsFile; from kvx.errors import KvxError\n"
            "try:\n    ResultsFile(sys.argv[1]).lock()\nexcept KvxError as e:\n    print(e); sys.exit(3)")
    run = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert run.returncode == 3 and "another kvx eval" in run.stdout
    del first
    import gc

    gc.collect()
    again = ResultsFile(out)
    again.lock()  # free once the first writer is gone
    assert len(again.rows) == 1


def test_append_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    results = ResultsFile(out)
    row = {"task": "passkey", "context": 1, "haystack": "noise", "seed": 0, "depth": 0.5, "mode": "agnostic",
           "policy": "full", "budget": "100%", "score": 1.0}
    results.append(row)
    before = out.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        results.append(dict(row, seed=1))
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["r.jsonl"]


# -- summary, table, plot -------------------------------------------------------------------------------

def _row(task, policy, budget, score, held=50, full=100):
    return {"task": task, "policy": policy, "budget": budget, "score": score,
            "kv_bytes_held": held, "kv_bytes_full": full}


HAND_ROWS = [
    _row("passkey", "full", "100%", 1.0, 100), _row("passkey", "full", "100%", 1.0, 100),
    _row("passkey", "snapkv", "10%", 0.0, 10), _row("passkey", "snapkv", "10%", 1.0, 12),
    _row("passkey", "snapkv", "5%", 0.0, 5), _row("passkey", "snapkv", "5%", 0.0, 5),
    _row("niah_multikey", "full", "100%", 0.5, 100), _row("niah_multikey", "snapkv", "5%", 0.25, 5),
]


def test_summary_means_per_task_policy_budget():
    cells = {(c.task, c.policy, c.budget): c for c in report.summarize(HAND_ROWS)}
    assert cells[("passkey", "snapkv", "10%")].mean_score == 0.5
    assert cells[("passkey", "snapkv", "10%")].kv_fraction == pytest.approx(0.11)
    assert cells[("passkey", "snapkv", "5%")].samples == 2 and cells[("passkey", "snapkv", "5%")].mean_score == 0
    assert cells[("passkey", "full", "100%")].mean_score == 1.0
    assert cells[("all", "full", "100%")].mean_score == pytest.approx(2.5 / 3)
    assert cells[("all", "snapkv", "5%")].mean_score == pytest.approx(0.25 / 3) and cells[("all", "snapkv", "5%")].samples == 3
    order = [(c.task, c.policy, c.budget) for c in report.summarize(HAND_ROWS)]
    assert order[:3] == [("passkey", "full", "100%"), ("passkey", "snapkv", "5%"), ("passkey", "snapkv", "10%")]
    assert order[-1][0] == "all"


def test_summary_table_shows_full_reference():
    from rich.console import Console

    console = Console(record=True, width=120)
    report.render_summary(report.summarize(HAND_ROWS), console)
    text = console.export_text()
    assert "full (reference)" in text and "passkey" in text and "0.50" in text and "0.08" in text


def test_plot_both_styles(tmp_path):
    for style in ("heatmap", "lines"):
        path = plot_results(HAND_ROWS, tmp_path / f"{style}.png", style)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["heatmap.png", "lines.png"]  # no temporary file left


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(KvxError, match=r"pip install 'kvx\[plot\]'"):
        plot_results(HAND_ROWS, tmp_path / "c.png")
    assert os.listdir(tmp_path) == []


def test_baseline_reference_and_error_cells(tmp_path):
    from rich.console import Console

    rows = HAND_ROWS[:6] + [
        _row("passkey", "kvpress:full", "100%", 1.0, 100),
        _row("passkey", "kvpress:snapkv", "10%", 0.0, 10),
        {"task": "passkey", "policy": "kvpress:pyramidkv", "budget": "10%", "score": None, "error": "RuntimeError: x"},
    ]
    cells = {(c.task, c.policy, c.budget): c for c in report.summarize(rows)}
    broken = cells[("passkey", "kvpress:pyramidkv", "10%")]
    assert broken.mean_score is None and broken.errors == 1 and broken.samples == 0
    assert broken.to_dict()["mean_score"] is None
    console = Console(record=True, width=160)
    report.render_summary(list(cells.values()), console)
    text = console.export_text()
    assert "kvpress:full (reference)" in text and "error" in text
    options = [dict(r, policy="tova[heads=layer]") for r in HAND_ROWS[2:4]]
    console = Console(record=True, width=160)
    report.render_summary(report.summarize(HAND_ROWS[:2] + options), console)
    assert "tova[heads=layer]" in console.export_text()
    assert "100%" not in text  # the references are rows, not a 100% budget column
    md = report.render_markdown(report.summarize(rows)).splitlines()
    assert md[0] == "**passkey** (2 samples per cell)" or md[0].startswith("**passkey** (1–2 samples")
    assert md[2] == "| policy | 5% | 10% |"
    assert "| full (reference) | 1.00 | 1.00 |" in md and "| kvpress:full (reference) | 1.00 | 1.00 |" in md
    assert "| snapkv | 0.00 | **0.50** |" in md and "| kvpress:pyramidkv | - | error |" in md
    assert "| K+V held / full (kvx) | 5.0% | 11.0% |" in md and "| K+V held / full (kvpress) | - | 10.0% |" in md
    plot = plot_results(rows, tmp_path / "c.png", "lines")  # error cells are left out of the lines
    assert plot.read_bytes()[:4] == b"\x89PNG"


class FakeBaseline:
    """Stands in for kvpress: answers the passkey when the budget is 50%, fails for one press."""

    name = "fake"

    def __init__(self):
        self.prefills = 0

    def pairs(self, budgets):
        return [("fake:full", "100%")] + [(f"fake:{p}", b) for p in ("good", "broken") for b in budgets]

    def prefill(self, prompt, aware=False):
        self.prefills += 1
        self.aware = aware

        class Shared:
            def answer(self, policy, budget, max_tokens):
                from kvx.eval.kvpress_baseline import BaselineAnswer

                if policy == "fake:broken":
                    raise RuntimeError("The size of tensor a (3) must match the size of tensor b (4)\nmore")
                # The answer prefix holds no digits: a wrong answer, scored 0.
                return BaselineAnswer(prediction=prompt.answer_prefix, kv_bytes_held=1, kv_bytes_full=2,
                                      generated_tokens=1)

        return Shared()


def test_baseline_rows_one_prefill_per_sample_and_errors_recorded(tiny, tmp_path):
    fake = FakeBaseline()
    out = tmp_path / "b.jsonl"
    rows = run_eval(tiny, _config(budgets=["50%", "25%"]), ResultsFile(out), baselines=[fake])
    assert fake.prefills == 2  # two samples, each prefilled once for all five of the baseline's rows
    theirs = [r for r in rows if r["policy"].startswith("fake:")]
    assert len(theirs) == 2 * 5
    broken = [r for r in theirs if r["policy"] == "fake:broken"]
    assert len(broken) == 4 and all(r["score"] is None for r in broken)
    assert all(r["error"] == "RuntimeError: The size of tensor a (3) must match the size of tensor b (4)"
               for r in broken)
    assert all(r["score"] == 0.0 for r in theirs if r["policy"] == "fake:good")
    from kvx.commands.eval import row_line

    assert row_line(broken[0]).endswith("fake:broken@50% error")
    assert row_line(theirs[0]).endswith("score 0.00")
    # Error rows are results too: a rerun does not retry them.
    again = FakeBaseline()
    run_eval(tiny, _config(budgets=["50%", "25%"]), ResultsFile(out), baselines=[again])
    assert again.prefills == 0
    aware = FakeBaseline()
    rows = run_eval(tiny, _config(mode="aware", samples=1), ResultsFile(tmp_path / "c.jsonl"), baselines=[aware])
    assert aware.aware and aware.prefills == 1 and {r["mode"] for r in rows} == {"aware"}


# -- kvpress ---------------------------------------------------------------------------------------------

def test_kvpress_budget_conversion():
    assert compression_ratio(parse_budget("10%"), 1000) == pytest.approx(0.9)
    assert compression_ratio(parse_budget("100%"), 1000) == 0.0
    assert compression_ratio(parse_budget("512"), 1024) == pytest.approx(0.5)
    assert compression_ratio(parse_budget("512"), 300) == 0.0  # more than the context: keep everything


def test_kvpress_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "kvpress", None)
    with pytest.raises(KvxError, match=r"pip install 'kvx\[kvpress\]'"):
        require_kvpress()
    with pytest.raises(KvxError, match="kvpress"):
        KvpressBaseline("unused", "cpu", torch.float32)


def test_command_rejects_bad_input_before_loading_a_model(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from kvx.commands.eval import eval_command

    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("other")(lambda: None)
    monkeypatch.setitem(sys.modules, "kvpress", None)
    out = str(tmp_path / "r.jsonl")
    for args, message in [(["--task", "nope"], "unknown task"), (["--policies", "nope"], "unknown policy"),
                          (["--budgets", "0%"], "budget"), (["--mode", "maybe"], "mode"),
                          (["--against", "kvpress"], "kvpress"), (["--json", "--markdown"], "choose one")]:
        result = CliRunner().invoke(app, ["eval", "--out", out, *args])
        assert isinstance(result.exception, KvxError) and message in str(result.exception), args


def test_summary_only_reads_the_file_and_runs_nothing(tiny, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    import kvx.options
    from kvx.commands.eval import eval_command

    out = tmp_path / "r.jsonl"
    run_eval(tiny, _config(budgets=["50%", "25%"]), ResultsFile(out))
    monkeypatch.setattr(kvx.options, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded a model")))
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["eval", "--out", str(out), "--summary-only", "--markdown",
                                      "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert "| policy | 25% | 50% |" in result.output and "| full (reference) |" in result.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    as_json = CliRunner().invoke(app, ["eval", "--out", str(out), "--summary-only", "--json"])
    assert json.loads(as_json.output)["rows"] == 6
    missing = CliRunner().invoke(app, ["eval", "--out", str(tmp_path / "none.jsonl"), "--summary-only"])
    assert isinstance(missing.exception, KvxError) and "no such results file" in str(missing.exception)
    (tmp_path / "empty.jsonl").write_text("")
    empty = CliRunner().invoke(app, ["eval", "--out", str(tmp_path / "empty.jsonl"), "--summary-only"])
    assert isinstance(empty.exception, KvxError) and "no results" in str(empty.exception)


# -- end to end on the default model ----------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_passkey_end_to_end(tmp_path):
    from kvx.eval.prompt import build_prompt
    from kvx.eval.tasks import generate
    from kvx.models import load_model
    from kvx.models.hub import pull_default_model

    model, tok = load_model(pull_default_model(quiet=True))
    engine = ModelRunner(model, tok)
    sample = generate("passkey", tok, 1024, 0, 0.5, "noise")
    prompt = build_prompt(tok, sample)
    text = tok.decode(prompt.full)
    assert text.endswith("<|im_start|>assistant\nThe pass key is ") and sample.context + "\n\nWhat is" in text

    config = EvalConfig(tasks=["passkey"], context=1024, policies=["snapkv"], budgets=["50%"], samples=3,
                        max_tokens=10, model="default", dtype="float32")
    rows = run_eval(engine, config, ResultsFile(tmp_path / "e2e.jsonl"))
    full = [r for r in rows if r["policy"] == "full"]
    assert len(full) == 3 and len(rows) == 6
    assert sum(r["score"] for r in full) / 3 >= 0.9, [r["prediction"] for r in full]
    assert all(r["context_tokens"] <= 1024 for r in rows)


@pytest.mark.parametrize("mode", ["agnostic", "aware"])
def test_batched_eval_rows_equal_the_sequential_ones(tiny, tmp_path, mode):
    """kvx eval decodes a sample's answers together through the batched engine; every row (prediction,
    score, bytes held, tokens) is what the one-after-another loop writes."""
    pols = ["snapkv", "h2o", "tova", "ada-snapkv", "streaming"]
    rows = {}
    for max_batch in (1, 4):
        out = tmp_path / f"r{max_batch}.jsonl"
        run_eval(tiny, _config(policies=pols, budgets=["50%", "25%"], mode=mode, max_batch=max_batch, max_tokens=6),
                 ResultsFile(out))
        rows[max_batch] = {(r["seed"], r["policy"], r["budget"]): r for r in ResultsFile(out).rows}
    assert rows[1].keys() == rows[4].keys() and len(rows[1]) == 2 * (len(pols) * 2 + 1)
    fields = ("prediction", "score", "kv_bytes_held", "kv_bytes_full", "prompt_tokens", "generated_tokens",
              "finish_reason")
    for key, row in rows[1].items():
        assert {f: row[f] for f in fields} == {f: rows[4][key][f] for f in fields}, key


# -- the plain-question aware setting, and KVzip in eval ------------------------------------------------------

def test_aware_plain_mode_ends_with_the_plain_question(tiny, tmp_path):
    from kvx.eval import tasks as task_gen
    from kvx.eval.prompt import build_prompt, prompt_text

    sample = task_gen.generate("passkey", tiny.tokenizer, 120, 0, 0.5, "noise")
    assert sample.answer_prefix  # RULER's "The pass key is"
    plain, ruler = build_prompt(tiny.tokenizer, sample, answer_prefix=False), build_prompt(tiny.tokenizer, sample)
    assert plain.context == ruler.context
    assert plain.question != ruler.question
    text = prompt_text(sample, tiny.tokenizer, answer_prefix=False)
    assert text.answer_prefix == "" and text.question == "\n\n" + sample.question + " Answer with the number only."
    fake = FakeBaseline()
    rows = run_eval(tiny, _config(mode="aware-plain", samples=1, policies=["snapkv", "kvzip"]),
                    ResultsFile(tmp_path / "p.jsonl"), baselines=[fake])
    assert {r["mode"] for r in rows} == {"aware-plain"}
    assert fake.aware and fake.prefills == 1
    mine = {r["policy"]: r for r in rows if not r["policy"].startswith("fake:")}
    assert set(mine) == {"full", "snapkv", "kvzip"}
    # the whole plain prompt is what was compressed: context + question, no answer prefix
    assert mine["snapkv"]["kv_bytes_full"] == mine["full"]["kv_bytes_full"]
    n = len(plain.full)
    cfg = tiny.config
    assert mine["snapkv"]["kv_bytes_full"] == cfg.num_layers * cfg.num_kv_heads * n * tiny.entry_bytes()
    assert mine["kvzip"]["kv_bytes_held"] == mine["snapkv"]["kv_bytes_held"]  # same budget, same bytes
    with pytest.raises(KvxError, match="aware-plain"):
        run_eval(tiny, _config(mode="plain"), ResultsFile(tmp_path / "q.jsonl"))


def test_kvzip_in_eval_equals_its_own_prefill(tiny):
    """SharedPrefill's reconstruction (one per sample, shared by every budget) equals the engine's own."""
    from kvx.policies import build_policy, parse_budget

    ids = _ids(90)
    pol, budgets = build_policy("kvzip", args={"chunk": "32"}), [parse_budget("20%"), parse_budget("50%")]
    shared = SharedPrefill(tiny, ids, [(pol, b) for b in budgets])
    for b in budgets:
        req = shared.fork(pol, b)
        own = tiny.new_request(_pool(tiny), capacity=len(ids), policy=pol, budget=b)
        tiny.prefill(own, ids)
        for a, c in zip(req.stats, own.stats):
            torch.testing.assert_close(a.col_max, c.col_max, rtol=1e-5, atol=1e-7)
        tiny.compress(req, headroom=0, pool=_pool(tiny))
        tiny.compress(own, headroom=0)
        assert _kept_positions(req) == _kept_positions(own)
    assert len(shared._stats) == 1  # the reconstruction ran once for both budgets

"""Tensor parallelism on the CPU (gloo): 2 ranks give one rank's tokens and keep exactly its entries.

The ranks are started once for the whole module (runtime/parallel/launch.py's run_ranks: this process is
rank 0, one spawned process is rank 1) and run every case; one device runs the same cases here. A case is a
batch through the one engine (tests/tp_ranks.py), its kept (layer, kv head, position) sets recorded after
every step, on the ranks gathered into the whole model's. Every collective has a timeout (KVX_TP_TIMEOUT),
and the command-line tests run under a subprocess timeout.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import tp_ranks
from checkpoints import make_checkpoint, make_model_folder
from kvx.runtime.parallel.launch import run_ranks
from test_cli_errors import installed_kvx


# One policy of every family: window-scored (snapkv), accumulated + decode-time (h2o), decode-time last row
# (tova), head-adaptive (ada-snapkv), model-wide (laprox; snapkv under the global allocator), kvzip.
FAMILIES = [("snapkv", "20%"), ("h2o", "20%"), ("tova", "30%"), ("ada-snapkv", "10%"), ("laprox", "15%"),
            ("snapkv@global", "15%"), ("kvzip", "20%")]
MODELS = {  # name -> (variant, overrides)
    "llama": ("llama_gqa_llama3", {}),
    "qwen2": ("qwen2", {}),  # qkv bias, 4 query heads per kv head
    "qwen3": ("qwen3", {}),  # q/k norm
    "mistral": ("mistral", {}),  # a sliding window of 8
    "llama_3kv": ("llama_gqa_llama3", dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96, head_dim=16)),  # 2 + 1
    "llama_1kv": ("llama_gqa_llama3", dict(num_key_value_heads=1)),  # fewer kv heads than ranks: replicated
}
# Decode-time eviction on replicated heads, long enough (40 tokens, DECODE_SLACK 16) for rounds to run: the
# mass summed over query heads (h2o, tova), the recent queries of the whole group (ahakv).
DECODE_FAMILIES = [("h2o", "20%"), ("tova", "30%"), ("ahakv", "25%")]
MIXED = [("snapkv", "20%"), ("h2o", "30%"), ("ada-snapkv", "64"), ("laprox", "10%"), ("full", None),
         ("tova", "50%")]


def _prompts(seed: int, count: int, lo: int = 60, hi: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 128) for _ in range(rng.randrange(lo, hi))] for _ in range(count)]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    paths = {}
    for name, (variant, overrides) in MODELS.items():
        path, _ = make_checkpoint(variant, tmp_path_factory.mktemp(name), max_position_embeddings=1024, **overrides)
        paths[name] = str(path)
    out = {}
    for model in ("llama", "qwen2", "qwen3", "mistral", "llama_3kv"):
        for policy, budget in FAMILIES:
            out[(model, policy)] = (paths[model], [policy] * 2, [budget] * 2, _prompts(len(out), 2), 6)
    for policy, budget in FAMILIES:
        out[("llama_1kv", policy)] = (paths["llama_1kv"], [policy] * 2, [budget] * 2, _prompts(len(out), 2), 6)
    for policy, budget in DECODE_FAMILIES:
        out[("llama_1kv", policy, "decode")] = (paths["llama_1kv"], [policy] * 2, [budget] * 2,
                                                _prompts(len(out), 2), 40)
    out[("qwen2", "mixed")] = (paths["qwen2"], [p for p, _ in MIXED], [b for _, b in MIXED],
                               _prompts(99, len(MIXED), 30, 250), 8)
    return out


@pytest.fixture(scope="module")
def results(cases):
    keys = list(cases)
    specs = [cases[k] for k in keys]
    one = tp_ranks.run_cases(None, specs)
    old = os.environ.get("KVX_TP_TIMEOUT")
    os.environ["KVX_TP_TIMEOUT"] = "60"
    try:
        two = run_ranks(2, tp_ranks.run_cases, (specs,))
    finally:
        if old is None:
            os.environ.pop("KVX_TP_TIMEOUT", None)
        else:
            os.environ["KVX_TP_TIMEOUT"] = old
    return {k: (a, b) for k, a, b in zip(keys, one, two)}


def _same(results, key):
    one, two = results[key]
    assert two["tokens"] == one["tokens"], key
    assert all(isinstance(t, list) and t for t in one["tokens"]), key
    assert two["kept"] == one["kept"], key  # every step's kept (layer, head, position) sets


@pytest.mark.parametrize("model", ["llama", "qwen2", "qwen3", "mistral", "llama_3kv"])
@pytest.mark.parametrize("policy", [p for p, _ in FAMILIES])
def test_two_ranks_equal_one(results, model, policy):
    if (model, policy) == ("mistral", "kvzip"):  # KVzip refuses sliding windows, on one rank as on two
        one, two = results[(model, policy)]
        assert one["tokens"] == two["tokens"] and all("sliding window" in t for t in two["tokens"])
        return
    _same(results, (model, policy))


@pytest.mark.parametrize("policy", [p for p, _ in FAMILIES])
def test_fewer_kv_heads_than_ranks_replicates_them_exactly(results, policy):
    _same(results, ("llama_1kv", policy))


@pytest.mark.parametrize("policy", [p for p, _ in DECODE_FAMILIES])
def test_decode_time_eviction_on_replicated_heads_equals_one_rank(results, policy):
    """Each replica attends with half the head's query heads; its eviction rounds rank the whole head's
    mass (or queries), so both replicas keep what one device keeps (tp_ranks._whole checks they agree)."""
    key = ("llama_1kv", policy, "decode")
    _same(results, key)
    one, _ = results[key]
    held = [[sum(len(h) for layer in seqs[i] for h in layer) for seqs in one["kept"] if i in seqs] for i in (0, 1)]
    # entries were evicted while decoding: some step holds fewer than the step before
    assert all(any(b < a for a, b in zip(h, h[1:])) for h in held), held


def test_a_mixed_batch_equals_one_rank(results):
    one, two = results[("qwen2", "mixed")]
    _same(results, ("qwen2", "mixed"))
    # the batch really ran together: some step had every sequence in it
    assert max(len(step) for step in two["kept"]) == len(MIXED)


def test_each_rank_holds_half_the_kv_bytes(results):
    """Measured: each rank's cache holds the blocks of its own kv heads only."""
    for model in ("llama", "qwen2"):
        one, two = results[(model, "snapkv")]
        for i, full in enumerate(one["kv_bytes_held"]):
            per_rank = [rank[i] for rank in two["kv_bytes_held"]]
            assert full > 0 and all(abs(b - full / 2) <= 0.05 * full for b in per_rank), (model, full, per_rank)
        # what a result reports is the whole model's: every rank's heads
        assert two["result_kv_bytes_held"] == one["result_kv_bytes_held"]


def test_each_rank_holds_half_the_sharded_weights(cases):
    path = cases[("qwen2", "snapkv")][0]
    full_total, full_repl = tp_ranks.weight_bytes(None, path)
    ranks = run_ranks(2, tp_ranks.weight_bytes, (path,))
    for total, repl in ranks:
        assert repl == full_repl  # the embedding and LM head are replicated (kvx/models/sharding.py)
        # the rest (every layer's projections; norms are replicated and a few hundred bytes) is halved
        assert abs((total - repl) - (full_total - full_repl) / 2) <= 0.02 * (full_total - full_repl)


@pytest.mark.parametrize("model", ["qwen2", "llama_3kv"])
def test_int8_weights_on_ranks_are_one_devices_sliced(cases, model):
    """--dtype auto on the CPU packs each rank's slices as int8 (options.load_rank): a row-parallel slice
    (o, down) takes its whole row's scale (an all-reduce of the slices' row maxima), so every rank's int8
    values and scales are exactly one device's, sliced."""
    path = cases[(model, "snapkv")][0]
    one, _ = tp_ranks.packed_int8(None, path)
    d = tp_ranks.load(path, None).config.head_dim
    for layers, shard in run_ranks(2, tp_ranks.packed_int8, (path,)):
        for full, part in zip(one, layers):
            (oq, os_), (pq, ps) = full["o"], part["o"]  # row-parallel: columns sliced, every row's scale
            assert torch.equal(ps, os_) and torch.equal(pq, oq[:, shard.q_lo * d:shard.q_hi * d])
            (dq, ds), (pdq, pds) = full["down"], part["down"]
            assert torch.equal(pds, ds) and torch.equal(pdq, dq[:, shard.i_lo:shard.i_hi])
            (gq, gs), (pgq, pgs) = full["gate_up"], part["gate_up"]  # column-parallel: rows sliced
            inter = gq.shape[0] // 2
            rows = list(range(shard.i_lo, shard.i_hi)) + list(range(inter + shard.i_lo, inter + shard.i_hi))
            assert torch.equal(pgq, gq[rows]) and torch.equal(pgs, gs[rows])


# -- the command line --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("tp_cli"), max_position_embeddings=8192)


def _kvx(*args, timeout=120, **kw):
    return subprocess.run([installed_kvx(), *args], capture_output=True, text=True, timeout=timeout, **kw)


def test_generate_with_two_ranks_prints_one_ranks_text(folder):
    # --dtype float32: the exact comparison (--dtype auto may pack one device's CPU weights, kvx/options.py)
    args = ["generate", "--model", str(folder), "--max-tokens", "12", "--policy", "ada-snapkv", "--budget", "30%",
            "--quiet", "--dtype", "float32", "The quick brown fox jumps over the lazy dog, again and again, until the dog wakes up."]
    one, two = _kvx(*args), _kvx(*args, "--tp", "2")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    assert two.stdout == one.stdout and one.stdout.strip()
    # The same command under torchrun: it starts the ranks (as on several machines), kvx joins them.
    import socket
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    joined = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(port), installed_kvx(), *args,
                             "--tp", "2"], capture_output=True, text=True, timeout=180)
    assert joined.returncode == 0, joined.stderr
    assert joined.stdout == one.stdout


def test_a_model_that_does_not_split_is_one_line(folder):
    proc = _kvx("generate", "--model", str(folder), "--tp", "3", "--max-tokens", "2", "hi")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("kvx: error: --tensor-parallel 3")


def test_a_killed_rank_ends_the_run_with_one_line(folder):
    import psutil

    env = dict(os.environ, KVX_TP_TIMEOUT="30")
    proc = subprocess.Popen([installed_kvx(), "generate", "--model", str(folder), "--tp", "2", "--max-tokens", "6000",
                             "--raw", "a b c d e f g"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        first = proc.stdout.read(1)  # text is streaming: the ranks are mid-run
        assert first, proc.stderr.read().decode()
        children = [c for c in psutil.Process(proc.pid).children(recursive=True) if "python" in c.name().lower()]
        rank1 = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        assert rank1, [c.cmdline() for c in children]
        started = time.monotonic()
        os.kill(rank1[-1].pid, signal.SIGKILL)
        proc.wait(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    assert proc.returncode != 0
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "rank 1" in lines[0] and "SIGKILL" in lines[0], err
    assert elapsed < 30


def test_profile_plan_reports_one_device_of_n(tmp_path):
    import json

    from kvx.commands.profile import ProfileSettings, run_profile

    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
           "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "eos_token_id": 2}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    base = dict(model=str(path), context=32768, budget="5%", plan_only=True, memory="80GiB", policy="snapkv")
    one = run_profile(ProfileSettings(**base), quiet=True)
    two = run_profile(ProfileSettings(**base, tensor_parallel=2), quiet=True)
    assert two["tensor_parallel"] == 2 and "per device of 2" in two["notes"][0]
    w1, w2 = one["planned"]["weights"]["bytes"], two["planned"]["weights"]["bytes"]
    embed = 2 * 128256 * 4096 * 2  # embedding + untied head, bf16, on every device
    norms = (2 * 32 + 1) * 4096 * 2  # every layer's two norms and the final one, replicated
    assert w2 == (w1 - embed - norms) // 2 + embed + norms
    assert two["planned"]["kv"]["full"]["bytes"] * 2 == one["planned"]["kv"]["full"]["bytes"]
    assert two["planned"]["kv"]["kept"]["entries"] * 2 == one["planned"]["kv"]["kept"]["entries"]
    # snapkv (uniform): a device holds its heads' share (at most one more entry per segment), as admission
    # counts; ada-snapkv may put the whole budget on one device's heads, and the plan counts that too.
    headroom = lambda r: r["planned"]["kv"]["headroom"]["tokens"] * 32 * 4  # noqa: E731 - segments x tokens
    kept1 = one["planned"]["kv"]["kept"]["entries"]
    assert two["planned"]["kv"]["held"]["slots"] - headroom(two) == kept1 // 2 + 32 * 4
    ada = run_profile(ProfileSettings(**{**base, "policy": "ada-snapkv"}, tensor_parallel=2), quiet=True)
    assert ada["planned"]["kv"]["kept"]["entries"] == kept1 // 2  # the even share, as expected
    assert ada["planned"]["kv"]["held"]["slots"] - headroom(ada) == kept1  # what admission reserves
    assert ada["planned"]["fits"]["max_batch_pool_budget"] < two["planned"]["fits"]["max_batch_pool_budget"]
    assert "whole budget" in ada["notes"][0] and "heads' share" in two["notes"][0]


@pytest.mark.parametrize("allocation", ["uniform", "pyramid"])
def test_a_rank_holds_its_heads_share_under_an_even_allocation(allocation):
    """scheduler.kept_on_rank's bound for allocators that are not head-adaptive: any contiguous range of a
    layer's kv heads (a rank's) keeps at most its share of the budget plus one entry per segment."""
    from kvx.policies.allocation import LayerCandidates
    from kvx.policies.budget import Budget
    from kvx.policies.registry import ALLOCATORS
    from kvx.runtime.engine.scheduler import kept_on_rank

    allocator = ALLOCATORS[allocation]()
    assert not allocator.head_adaptive and ALLOCATORS["ada"].head_adaptive and ALLOCATORS["global"].head_adaptive
    rng = random.Random(7)
    for _ in range(60):
        L, hkv, n = rng.randrange(1, 9), rng.randrange(2, 9), rng.randrange(8, 300)
        total = rng.randrange(L * hkv, L * hkv * n)
        counts = allocator.allocate([LayerCandidates(torch.rand(hkv, n), 0, n) for _ in range(L)], total)
        assert sum(map(sum, counts)) == total
        lo = rng.randrange(hkv)
        hi = rng.randrange(lo + 1, hkv + 1)
        held = sum(sum(layer[lo:hi]) for layer in counts)
        assert held <= -(-total * (hi - lo) // hkv) + L * (hi - lo), (allocation, L, hkv, n, total, lo, hi)
    # kept_on_rank is that bound for the budget's K (and the whole K when head-adaptive)
    cfg = _config_like(num_layers=4, num_kv_heads=2, model_kv_heads=8)
    budget = Budget(fraction=0.1)
    K = budget.total_entries(500, 4, 8)
    assert kept_on_rank(cfg, 500, budget, False) == -(-K * 2 // 8) + 4 * 2
    assert kept_on_rank(cfg, 500, budget, True) == K


def _config_like(**fields):
    from dataclasses import replace as dc_replace

    from kvx.models.config import ModelConfig

    base = ModelConfig(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=32, num_layers=2,
                       num_heads=8, num_kv_heads=8, head_dim=8, rope_theta=1e4, rope_scaling=None, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, qkv_bias=False, qk_norm=False, sliding_window=None,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_ids=[2], torch_dtype="float32")
    return dc_replace(base, **fields)


def _arrivals(seed: int):
    rng = random.Random(seed)
    names = ["a", "b", "c", "d", "e", "f"]
    specs = [("snapkv", "20%"), ("ada-snapkv", "10%"), ("laprox", "15%"), ("full", None), ("h2o", "30%"),
             ("ada-snapkv", "64")]
    events = [(rng.randrange(0, 12), "submit", n, ids, p, b, 10)
              for n, ids, (p, b) in zip(names, _prompts(seed, len(names), 40, 220), specs)]
    submit_step = {e[2]: e[0] for e in events}
    events.append((submit_step["e"] + 3, "cancel", "e"))  # a client goes away mid-run
    return events


@pytest.mark.parametrize("model", ["qwen2", "llama_3kv"])  # llama_3kv: 3 kv heads, rank 0 holds 2, rank 1 one
def test_rank_0_plans_arrivals_and_cancels_and_the_ranks_follow(cases, model):
    """Requests arrive at different steps and one is cancelled, as in a server: only rank 0 is asked; the
    other rank follows its broadcast plans. The tokens equal one rank's, and the small pool made requests
    wait (admission agreed by every rank)."""
    path = cases[(model, "snapkv")][0]
    events = _arrivals(5)
    # Each rank's pool holds what its share of one rank's does: half, or 2 of llama_3kv's 3 kv heads.
    memory, share = {"qwen2": (96 << 10, 1 / 2), "llama_3kv": (400 << 10, 2 / 3)}[model]
    one = tp_ranks.run_schedule(None, path, events, kv_memory=memory, max_batch=4)
    two = run_ranks(2, tp_ranks.run_schedule, (path, events, int(memory * share), 4))
    assert two["tokens"] == one["tokens"]
    assert one["tokens"]["e"][0] == "cancelled"
    assert two["most_waiting"] > 0 and one["most_waiting"] > 0


def test_serve_with_two_ranks_answers_as_one_rank(tmp_path_factory):
    """kvx serve --tp 2: rank 0 serves, rank 1 follows its plans; concurrent requests with their own
    policies get one rank's answers; SIGTERM ends every rank."""
    import concurrent.futures

    import httpx

    from serve_helpers import tiny_model_dir, words
    from test_serve_cli import ServeProcess

    model = str(tiny_model_dir(tmp_path_factory.mktemp("tp_serve")))
    bodies = [{"prompt": words(n, n), "max_tokens": 12, "temperature": 0, **kv}
              for n, kv in [(80, {"kv_policy": "snapkv", "kv_budget": "20%"}), (120, {"kv_policy": "ada-snapkv",
                            "kv_budget": "10%"}), (60, {}), (150, {"kv_policy": "laprox", "kv_budget": "15%"})]]

    def answers(server):
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            replies = list(pool.map(lambda b: httpx.post(server.url + "/v1/completions", json=b, timeout=120),
                                    bodies))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        return [r.json()["choices"][0]["text"] for r in replies]

    one = ServeProcess("--model", model, "--kv-memory", "64MiB", "--dtype", "float32")
    try:
        want = answers(one)
    finally:
        one.close()
    two = ServeProcess("--model", model, "--kv-memory", "64MiB", "--dtype", "float32", "--tp", "2")
    try:
        assert answers(two) == want
        from kvx.serve.metrics import parse

        metrics = parse(httpx.get(two.url + "/metrics", timeout=10).text)
        per_rank = [metrics[f'kvx:rank_kv_blocks_total{{rank="{r}"}}'] for r in (0, 1)]
        assert per_rank[0] == per_rank[1] == metrics["kvx:kv_blocks_total"] > 0
        import psutil

        ranks = psutil.Process(two.proc.pid).children(recursive=True)
        two.proc.send_signal(signal.SIGTERM)
        two.proc.wait(60)
        assert two.proc.returncode == -signal.SIGTERM, "".join(two.stderr)
        gone, alive = psutil.wait_procs(ranks, timeout=30)
        assert not alive
        assert "Traceback" not in "".join(two.stderr)
    finally:
        two.close()


@pytest.fixture(scope="module")
def folder_3kv(tmp_path_factory):
    """3 kv heads, as the default model: 2 ranks hold 2 and 1."""
    return make_model_folder(tmp_path_factory.mktemp("tp_cli_3kv"), max_position_embeddings=8192,
                             **MODELS["llama_3kv"][1])


@pytest.mark.parametrize("kv", ["even", "uneven"])
def test_jsonl_with_two_ranks_equals_one(folder, folder_3kv, kv):
    folder = folder if kv == "even" else folder_3kv
    lines = "\n".join(json.dumps(x) for x in [
        {"id": "a", "prompt": "the quick brown fox " * 12, "policy": "snapkv", "budget": "20%"},
        {"id": "b", "prompt": "jumps over the lazy dog " * 9, "policy": "ada-snapkv", "budget": "15%"},
        {"id": "c", "prompt": "hello", "policy": "h2o", "budget": "50%"},
        {"id": "d", "prompt": "and again " * 20, "policy": "laprox", "budget": "10%"}]) + "\n"
    args = ["generate", "--jsonl", "--model", str(folder), "--max-tokens", "10", "--dtype", "float32", "--ordered",
            "--max-batch", "2", "--quiet"]
    one, two = _kvx(*args, input=lines), _kvx(*args, "--tp", "2", input=lines)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    got = [json.loads(x) for x in two.stdout.splitlines()]
    want = [json.loads(x) for x in one.stdout.splitlines()]
    assert [(g["id"], g["text"], g["generated_tokens"]) for g in got] == [
        (w["id"], w["text"], w["generated_tokens"]) for w in want] and len(want) == 4


def test_bench_times_the_collectives_share(folder):
    proc = _kvx("bench", "--suite", "tensor-parallel", "--tp", "2", "--model", str(folder), "--decode-contexts", "40",
                "--decode-steps", "4", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert [x["rank"] for x in r["ranks"]] == [0, 1]
    for x in r["ranks"]:
        assert x["decode_steps"] == r["one_rank"]["1_threads"]["decode_steps"] >= 2
        assert 0 < x["comm_share"] < 1 and x["collectives_per_step"] > 4 and x["bare_all_reduce_ms"] > 0


def test_a_rank_that_stops_answering_ends_the_run_in_bounded_time(monkeypatch):
    from kvx.runtime.parallel.launch import RankFailed

    monkeypatch.setenv("KVX_TP_TIMEOUT", "3")  # the collectives' timeout (the ranks' start-up waits longer)
    started = time.monotonic()
    with pytest.raises(RankFailed) as err:
        run_ranks(2, tp_ranks.stall_rank_1)
    assert "rank 0 failed" in str(err.value) and "Timed out" in str(err.value) and "\n" not in str(err.value)
    assert time.monotonic() - started < 90


def test_a_rank_that_fails_while_starting_ends_the_run_with_its_cause(monkeypatch):
    """A rank that fails before its first collective (a file missing where it runs, say) ends the run
    with one line naming that rank and the cause, while rank 0 waits for it: no hang, no timeout needed."""
    from kvx.runtime.parallel.launch import RankFailed

    monkeypatch.setenv("KVX_TP_TIMEOUT", "60")  # longer than the bound below: the failure, not a timeout
    started = time.monotonic()
    with pytest.raises(RankFailed) as err:
        run_ranks(2, tp_ranks.fail_rank_1_before_any_collective)
    message = str(err.value)
    assert "rank 1" in message and "no such file on this rank" in message and "\n" not in message, message
    assert time.monotonic() - started < 45


def test_eval_with_two_ranks_writes_one_ranks_rows(folder, tmp_path):
    args = ["eval", "--task", "passkey", "--context", "300", "--samples", "2", "--policies", "snapkv,ada-snapkv,laprox",
            "--budgets", "20%", "--model", str(folder), "--dtype", "float32", "--quiet", "--max-tokens", "8"]
    one = _kvx(*args, "--out", str(tmp_path / "one.jsonl"), timeout=300)
    two = _kvx(*args, "--out", str(tmp_path / "two.jsonl"), "--tp", "2", timeout=300)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)

    def rows(name):
        return [(r["policy"], r["seed"], r["prediction"], r["kv_bytes_held"], r["kv_bytes_full"])
                for r in map(json.loads, (tmp_path / name).read_text().splitlines())]

    assert rows("two.jsonl") == rows("one.jsonl") and len(rows("one.jsonl")) == 8


def test_eval_fidelity_with_two_ranks_equals_one(folder, tmp_path):
    """--fidelity on ranks: the KL and top-1 from every rank's whole logits, the per-layer attention error
    summed over the ranks' query heads; h2o evicts while teacher-forcing."""
    args = ["eval", "--task", "passkey", "--context", "300", "--samples", "1", "--policies", "snapkv,h2o",
            "--budgets", "20%", "--model", str(folder), "--dtype", "float32", "--quiet", "--max-tokens", "24",
            "--fidelity"]
    one = _kvx(*args, "--out", str(tmp_path / "one.jsonl"), timeout=300)
    two = _kvx(*args, "--out", str(tmp_path / "two.jsonl"), "--tp", "2", timeout=300)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)

    def rows(name):
        return {r["policy"]: r["fidelity"] for r in map(json.loads, (tmp_path / name).read_text().splitlines())
                if "fidelity" in r}

    a, b = rows("one.jsonl"), rows("two.jsonl")
    assert set(a) == set(b) == {"snapkv", "h2o"}
    for name in a:
        assert b[name]["top1"] == a[name]["top1"], name
        assert abs(b[name]["kl"] - a[name]["kl"]) <= 1e-4 + 1e-3 * a[name]["kl"], name
        assert len(b[name]["layer_rel_error"]) == len(a[name]["layer_rel_error"]) > 0
        for x, y in zip(a[name]["layer_rel_error"], b[name]["layer_rel_error"]):
            assert abs(x - y) <= 1e-3 + 1e-3 * x, (name, a[name]["layer_rel_error"], b[name]["layer_rel_error"])
        assert any(e > 0 for e in a[name]["layer_rel_error"])  # the compressed layers really differ


@pytest.mark.parametrize("kv,world,want", [(3, 2, [2, 1]), (5, 4, [2, 1, 1, 1]), (8, 4, [2, 2, 2, 2]), (7, 3, [3, 2, 2])])
def test_an_uneven_split_gives_the_extra_kv_heads_to_the_lowest_ranks(kv, world, want):
    """Rank 0 schedules for every rank, so it holds the most kv heads (runtime/parallel/plan.py)."""
    from kvx.models.config import ModelConfig
    from kvx.models.sharding import shard_for

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=16, hidden_size=kv * 16, intermediate_size=64,
                      num_layers=1, num_heads=kv * 2, num_kv_heads=kv, head_dim=16, rms_norm_eps=1e-6,
                      rope_theta=1e4, rope_scaling=None, tie_word_embeddings=True, qkv_bias=False, qk_norm=False,
                      sliding_window=None, max_position_embeddings=64, bos_token_id=None, eos_token_ids=[],
                      torch_dtype="float32")
    shards = [shard_for(cfg, r, world) for r in range(world)]
    assert [s.kv_heads for s in shards] == want
    assert shards[0].kv_lo == 0 and shards[-1].kv_hi == kv
    assert all(a.kv_hi == b.kv_lo and a.q_hi == b.q_lo for a, b in zip(shards, shards[1:]))

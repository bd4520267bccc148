"""The GPU decode paths, run on the CPU: Triton kernels under the interpreter, CUDA graphs emulated.

On a machine without CUDA nothing else runs the code a GPU runs between the kernels: the engine's calls
into the Triton wrappers (shapes, strides, dtypes, grids) and the two captured decode steps (the single
sequence's DecodeGraph, the batch's StaticStep), which must read only their static buffers and never sync
with the host. Here KVX_KERNELS=triton sends every kernel call to the Triton kernels (interpreted), and
tests/cuda_graph_emulator.py stands in for torch.cuda's graphs: captures record, replays re-run exactly
what was recorded (stale Python values included), and a host sync inside a capture raises. Each case is
compared token for token with the plain-PyTorch path (float32, greedy). tests/test_gpu_engine.py runs the
same comparisons with real graphs where a GPU is present.
"""

from __future__ import annotations

import random

import pytest
import torch

from interpreter import HAS_CUDA, interpreter_active, request_interpreter, rerun_in_fresh_process

request_interpreter()

from checkpoints import make_checkpoint  # noqa: E402
from cuda_graph_emulator import CaptureError, emulate_cuda_graphs, fake_graph, FakeCUDAGraph  # noqa: E402
from kvx.kernels import ops  # noqa: E402
from kvx.models.transformer import Transformer  # noqa: E402
from kvx.policies import build_policy, parse_budget  # noqa: E402
from kvx.runtime import engine as engine_module  # noqa: E402
from kvx.runtime.batch import BatchEngine  # noqa: E402
from kvx.runtime.batch_step import BatchStepper  # noqa: E402
from kvx.runtime.engine import Engine  # noqa: E402
from kvx.runtime.graphs import capturable  # noqa: E402
from test_batch import _ids, _request  # noqa: E402
from test_compression import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)
from test_engine import StubTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def interpreted():
    if HAS_CUDA:
        pytest.skip("CUDA present: tests/test_gpu_engine.py runs these paths for real")
    pytest.importorskip("triton")
    if not interpreter_active():
        pytest.skip("triton was imported before TRITON_INTERPRET could be set; "
                    "test_capture_cases_in_a_fresh_process runs these cases")


def test_capture_cases_in_a_fresh_process():
    if HAS_CUDA or interpreter_active():
        pytest.skip("the cases run in this process (or CUDA covers them)")
    pytest.importorskip("triton")
    run = rerun_in_fresh_process(__file__, "emulated or interpreted")
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]


@pytest.fixture
def graphs(interpreted, monkeypatch):
    """Triton kernels for every call, torch.cuda's graphs emulated, the single engine allowed to capture."""
    monkeypatch.setenv(ops.BACKEND_ENV, "triton")
    emulate_cuda_graphs(monkeypatch)
    monkeypatch.setattr(engine_module, "graphs_supported", capturable)


def _reference(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "reference")


# -- the emulator itself --------------------------------------------------------------------------------

def test_emulated_replay_uses_what_was_captured(graphs):
    """Python values are baked in at capture; tensors are read at replay; nothing runs while capturing."""
    x, y = torch.zeros(3), torch.ones(3)
    step = 2.0
    g = FakeCUDAGraph()
    with torch.inference_mode():
        x, y = x.clone(), y.clone()
        with fake_graph(g):
            x.add_(y * step)
        assert torch.equal(x, torch.zeros(3))  # capture ran no in-place op
        step = 100.0  # a later Python value: the replay still uses 2
        y.fill_(3.0)  # a later tensor value: the replay reads it
        g.replay()
        assert torch.equal(x, torch.full((3,), 6.0))
        g.replay()
        assert torch.equal(x, torch.full((3,), 12.0))


@pytest.mark.parametrize("sync", ["item", "bool", "nonzero", "mask", "tensor"])
def test_emulated_capture_refuses_host_syncs(graphs, sync):
    t = torch.arange(5.0)
    calls = {"item": lambda: t.sum().item(), "bool": lambda: bool(t.max() > 2), "nonzero": lambda: t.nonzero(),
             "mask": lambda: t[t > 2], "tensor": lambda: torch.tensor([1, 2, 3])}
    with torch.inference_mode(), pytest.raises(CaptureError), fake_graph(FakeCUDAGraph()):
        calls[sync]()


# -- the single-sequence engine ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path, _ = make_checkpoint("llama_gqa_llama3", tmp_path_factory.mktemp("llama"), max_position_embeddings=4096)
    return Transformer.from_pretrained(path)


SINGLE = [(None, None), ("snapkv", "20%"), ("ada-snapkv", "20%"), ("laprox", "10%")]


@pytest.mark.parametrize("policy,budget", SINGLE, ids=[p or "full" for p, _ in SINGLE])
def test_emulated_decode_graph_equals_reference(llama, graphs, monkeypatch, policy, budget):
    ids = _ids(random.Random(7), 90, 91)

    def run(use_graphs):
        eng = Engine(llama, StubTokenizer(), build_policy(policy) if policy else None,
                     parse_budget(budget) if budget else None, use_graphs=use_graphs)
        req = eng.new_request(capacity=len(ids) + 16, policy=eng.policy, budget=eng.budget)
        logits = eng.prefill(req, ids, eng.stats_request(req, len(ids)))
        if policy:
            eng.compress(req, headroom=16)
            assert req.cache.total_entries() < 0.5 * len(ids) * len(req.cache.layers) * req.cache.num_kv_heads
        from kvx.runtime.sampling import SamplingParams
        out, _, _ = eng.decode(req, logits, SamplingParams(), 14, stop_at_eos=False)
        return out, req

    graphed, req = run(True)
    assert req.graph is not None and req.graph.captures == 1 and req.graph.graph.replays == 13
    eager, req = run(False)
    assert req.graph is None
    _reference(monkeypatch)
    plain, _ = run(False)
    assert graphed == eager == plain


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    # a sliding window of 8, far shorter than the prompts: the decode kernel hides keys by position
    path, _ = make_checkpoint("mistral", tmp_path_factory.mktemp("mistral"), max_position_embeddings=4096)
    return Transformer.from_pretrained(path)


WINDOWED = [(None, None), ("snapkv", "30%"), ("tova", "30%")]


@pytest.mark.parametrize("policy,budget", WINDOWED, ids=[p or "full" for p, _ in WINDOWED])
def test_emulated_decode_graph_with_a_sliding_window(mistral, graphs, monkeypatch, policy, budget):
    """A sliding-window model's decode step is captured too (the window applied in the decode kernel from
    the cache's positions and the step's position buffer): tokens equal eager and the plain path."""
    from kvx.runtime.sampling import SamplingParams

    ids = _ids(random.Random(13), 60, 61)
    steps = 20

    def run(use_graphs):
        eng = Engine(mistral, StubTokenizer(), build_policy(policy) if policy else None,
                     parse_budget(budget) if budget else None, use_graphs=use_graphs)
        req = eng.new_request(capacity=len(ids) + steps, policy=eng.policy, budget=eng.budget)
        logits = eng.prefill(req, ids, eng.stats_request(req, len(ids)))
        eng.compress(req, headroom=steps)
        out, _, _ = eng.decode(req, logits, SamplingParams(), steps, stop_at_eos=False)
        return out, req

    graphed, req = run(True)
    assert req.graph is not None and req.graph.captures == 1
    eager, _ = run(False)
    _reference(monkeypatch)
    plain, _ = run(False)
    assert graphed == eager == plain


EVICTING = [("h2o", "25%"), ("tova", "30%"), ("streaming", "20%"), ("ahakv", "25%")]


@pytest.mark.parametrize("policy,budget", EVICTING, ids=[p for p, _ in EVICTING])
def test_emulated_decode_graph_with_decode_time_eviction(llama, graphs, monkeypatch, policy, budget):
    """A policy that evicts while decoding replays one captured graph through two eviction rounds (the kept
    entries are written back into the same pools, the mass by the captured kernel, AhaKV's queries through
    a static buffer), token for token as eager decode through the Triton kernels and the plain path."""
    from kvx.runtime.decode_eviction import DECODE_SLACK
    from kvx.runtime.sampling import SamplingParams

    ids = _ids(random.Random(11), 90, 91)
    steps = 2 * DECODE_SLACK + 6

    def run(use_graphs):
        eng = Engine(llama, StubTokenizer(), build_policy(policy), parse_budget(budget), use_graphs=use_graphs)
        req = eng.new_request(capacity=len(ids), policy=eng.policy, budget=eng.budget)
        logits = eng.prefill(req, ids, eng.stats_request(req, len(ids)))
        eng.compress(req, headroom=steps)
        targets = [list(t) for t in req.head_budget]
        pools = [lc.k.data_ptr() for lc in req.cache.layers]
        out, _, _ = eng.decode(req, logits, SamplingParams(), steps, stop_at_eos=False)
        for lc, target in zip(req.cache.layers, targets):  # evicted back to budget while decoding
            assert all(n < t + DECODE_SLACK for n, t in zip(lc.lengths, target))
        assert sum(map(sum, req.cache.lengths())) < sum(map(sum, targets)) + len(ids)
        return out, req, pools

    def mass(req):  # H2O's and TOVA's running scores, as the eviction reads them
        return torch.cat([lc.head_mass(g) for lc in req.cache.layers for g in range(req.cache.num_kv_heads)])

    graphed, req, pools = run(True)
    graphed_mass = mass(req)
    assert req.graph is not None and req.graph.captures == 1 and req.graph.graph.replays == steps - 1
    assert [lc.k.data_ptr() for lc in req.cache.layers] == pools  # evicted in place
    if policy == "ahakv":
        assert tuple(req.recent_q.shape[:3]) == (llama.config.num_layers, llama.config.num_heads, 32)
    eager, req, _ = run(False)
    assert req.graph is None
    torch.testing.assert_close(graphed_mass, mass(req), rtol=1e-5, atol=1e-6)
    _reference(monkeypatch)
    plain, _, _ = run(False)
    assert graphed == eager == plain


# -- the batched engine -----------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["qwen2", "mistral"])
def small(request, tmp_path_factory):
    # mistral: a sliding window (8) shorter than every prompt, which the captured paged attention applies.
    path, _ = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param), max_position_embeddings=4096)
    return Transformer.from_pretrained(path)


# Every decode-time path the static buffers feed, and compressed-once and full requests beside them.
BATCH = [("h2o", "25%"), ("tova", "30%"), ("ahakv", "25%"), ("streaming", "20%"), ("snapkv", "10%"),
         ("ada-snapkv", "15%"), ("full", None)]


def test_emulated_batch_graphs_equal_reference(small, graphs, monkeypatch):
    """The batched step replayed from emulated CUDA graphs (padded to batch buckets, block tables and
    lengths in static buffers, decode-time eviction rewriting them between replays) against the same
    batch decoded eagerly through the Triton kernels and through the plain-PyTorch path."""
    rng = random.Random(9)
    prompts = [_ids(rng, 30, 80) for _ in BATCH]
    lengths = [16, 5, 12, 9, 6, 3, 11]  # the batch shrinks through the buckets 8, 4, 2, 1

    def run(use_graphs):
        batch = BatchEngine(Engine(small, StubTokenizer()), kv_memory=32 << 20, max_batch=8)
        batch.stepper = BatchStepper(batch.engine, batch.pool, use_graphs=use_graphs)
        seqs = [batch.submit(_request(ids, n, b, m)) for ids, (n, b), m in zip(prompts, BATCH, lengths)]
        batch.run()
        assert batch.pool.num_used == 0 and batch.pool.reserved == 0
        return [s.results[0].token_ids for s in seqs], batch.stepper

    graphed, stepper = run(True)
    assert stepper.captures >= 4 and stepper.replays >= 2 * stepper.captures
    assert stepper.capture_s > 0  # what benchmarks leave out of decode time
    assert {key[0] for key in stepper._entries} >= {8, 4, 2, 1}
    eager, stepper = run(False)
    assert stepper.captures == 0 and stepper.capture_s == 0
    _reference(monkeypatch)
    plain, _ = run(False)
    assert graphed == eager == plain
    assert [len(t) for t in graphed] == lengths

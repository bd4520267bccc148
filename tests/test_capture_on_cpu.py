"""The GPU decode paths, run on the CPU: Triton kernels under the interpreter, CUDA graphs emulated.

On a machine without CUDA nothing else runs the code a GPU runs between the kernels: the engine's calls
into the Triton wrappers (shapes, strides, dtypes, grids) and the captured decode step (the batch's
StaticStep, a lone request being a batch of one), which must read only its static buffers and never sync
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
from kvx.runtime.engine.batch_engine import BatchEngine  # noqa: E402
from kvx.runtime.engine.batch_step import BatchStepper  # noqa: E402
from kvx.runtime.engine.model_runner import ModelRunner  # noqa: E402
from kvx.runtime.engine.sequence import GenerationRequest  # noqa: E402
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
    """Triton kernels for every call, torch.cuda's graphs emulated."""
    monkeypatch.setenv(ops.BACKEND_ENV, "triton")
    emulate_cuda_graphs(monkeypatch)


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


# -- a lone request: a batch of one ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path, _ = make_checkpoint("llama_gqa_llama3", tmp_path_factory.mktemp("llama"), max_position_embeddings=4096)
    return Transformer.from_pretrained(path)


def _alone(model, policy, budget, ids, steps, use_graphs):
    """One request through the engine as `kvx generate` runs it: (tokens, stepper, kept entries)."""
    eng = ModelRunner(model, StubTokenizer())
    request = GenerationRequest(prompt_ids=ids, max_tokens=steps, stop_at_eos=False,
                                policy=build_policy(policy) if policy else None,
                                budget=parse_budget(budget) if budget else None)
    batch = BatchEngine(eng, kv_memory=32 << 20, max_batch=1)
    batch.stepper = BatchStepper(eng, batch.pool, use_graphs=use_graphs)
    seq = batch.submit(request)
    batch.run()
    assert batch.pool.num_used == 0 and batch.pool.reserved == 0
    return seq.results[0].token_ids, batch.stepper, seq.results[0].kv_entries_kept


SINGLE = [(None, None), ("snapkv", "20%"), ("ada-snapkv", "20%"), ("laprox", "10%")]


@pytest.mark.parametrize("policy,budget", SINGLE, ids=[p or "full" for p, _ in SINGLE])
def test_emulated_batch_of_one_equals_reference(llama, graphs, monkeypatch, policy, budget):
    ids = _ids(random.Random(7), 90, 91)
    graphed, stepper, _ = _alone(llama, policy, budget, ids, 14, True)
    assert stepper.captures >= 1 and stepper.replays == 13
    assert {key[0] for key in stepper._entries} == {1}  # the batch bucket of one
    eager, stepper, _ = _alone(llama, policy, budget, ids, 14, False)
    assert stepper.captures == 0
    _reference(monkeypatch)
    plain, _, _ = _alone(llama, policy, budget, ids, 14, False)
    assert graphed == eager == plain and len(plain) == 14


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    # a sliding window of 8, far shorter than the prompts: the decode kernel hides keys by position
    path, _ = make_checkpoint("mistral", tmp_path_factory.mktemp("mistral"), max_position_embeddings=4096)
    return Transformer.from_pretrained(path)


WINDOWED = [(None, None), ("snapkv", "30%"), ("tova", "30%")]


@pytest.mark.parametrize("policy,budget", WINDOWED, ids=[p or "full" for p, _ in WINDOWED])
def test_emulated_batch_of_one_with_a_sliding_window(mistral, graphs, monkeypatch, policy, budget):
    """A sliding-window model's lone request is captured too (the window applied in the paged kernel from
    the pool's positions and the step's position buffer): tokens equal eager and the plain path."""
    ids = _ids(random.Random(13), 60, 61)
    graphed, stepper, _ = _alone(mistral, policy, budget, ids, 20, True)
    assert stepper.captures >= 1
    eager, _, _ = _alone(mistral, policy, budget, ids, 20, False)
    _reference(monkeypatch)
    plain, _, _ = _alone(mistral, policy, budget, ids, 20, False)
    assert graphed == eager == plain


EVICTING = [("h2o", "25%"), ("tova", "30%"), ("streaming", "20%"), ("ahakv", "25%")]


@pytest.mark.parametrize("policy,budget", EVICTING, ids=[p for p, _ in EVICTING])
def test_emulated_batch_of_one_with_decode_time_eviction(llama, graphs, monkeypatch, policy, budget):
    """A lone request whose policy evicts while decoding replays the captured step through two eviction
    rounds (the kept entries move inside their own blocks, the mass written by the captured kernel,
    AhaKV's queries through a static buffer), token for token as eager and the plain path."""
    from kvx.runtime.compression.decode_eviction import DECODE_SLACK

    ids = _ids(random.Random(11), 90, 91)
    steps = 2 * DECODE_SLACK + 6
    graphed, stepper, kept = _alone(llama, policy, budget, ids, steps, True)
    assert stepper.captures >= 1 and stepper.replays == steps - 1
    cfg = llama.config
    # evicted back to budget while decoding: far fewer entries than the prompt and the answer in full
    assert kept < 0.5 * (len(ids) + steps) * cfg.num_layers * cfg.num_kv_heads
    eager, _, kept_eager = _alone(llama, policy, budget, ids, steps, False)
    _reference(monkeypatch)
    plain, _, kept_plain = _alone(llama, policy, budget, ids, steps, False)
    assert graphed == eager == plain and kept == kept_eager == kept_plain


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
        batch = BatchEngine(ModelRunner(small, StubTokenizer()), kv_memory=32 << 20, max_batch=8)
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

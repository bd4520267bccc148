"""The GPU path end to end (skipped without CUDA): Triton kernels and CUDA-graph decode steps against the CPU.

kvx has one engine: a lone request (`kvx generate`) is a batch of one in the batched engine over a paged
pool, captured per (batch bucket, width bucket, mass) shape like any batch. Each case here runs the same
request or batch on the CPU (plain PyTorch), and on the GPU with graphs on and off (ModelRunner(use_graphs=...)),
and compares them token for token (float32, greedy). tests/test_capture_on_cpu.py runs the same paths on a
CPU with the kernels interpreted and the graphs emulated.
"""

from __future__ import annotations

import pytest
import torch

from checkpoints import make_checkpoint
from kvx.models.transformer import Transformer
from kvx.policies import build_policy, parse_budget
from kvx.runtime.engine.batch_engine import BatchEngine, generate
from kvx.runtime.compression.decode_eviction import DECODE_SLACK
from kvx.runtime.engine.model_runner import ModelRunner
from kvx.runtime.engine.sequence import GenerationRequest
from test_engine import StubTokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path, _ = make_checkpoint("llama_gqa_llama3", tmp_path_factory.mktemp("ck"), max_position_embeddings=4096)
    return Transformer.from_pretrained(path), Transformer.from_pretrained(path, device="cuda")


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    # a sliding window of 8, far shorter than the prompts: the paged kernel hides keys by position
    path, _ = make_checkpoint("mistral", tmp_path_factory.mktemp("mistral"), max_position_embeddings=4096)
    return Transformer.from_pretrained(path), Transformer.from_pretrained(path, device="cuda")


def _spec(policy, budget):
    return (build_policy(policy) if policy else None), (parse_budget(budget) if budget else None)


def _alone(model, policy, budget, ids, steps, use_graphs=True):
    """One request as a batch of one (what `kvx generate` runs): (result, stepper). Every block goes back."""
    pol, bud = _spec(policy, budget)
    batch = BatchEngine(ModelRunner(model, StubTokenizer(), use_graphs=use_graphs), kv_memory=64 << 20, max_batch=1)
    seq = batch.submit(GenerationRequest(prompt_ids=ids, max_tokens=steps, stop_at_eos=False, policy=pol,
                                         budget=bud))
    batch.run()
    assert batch.pool.num_used == 0 and batch.pool.reserved == 0
    assert len(seq.results) == 1, seq.error
    return seq.results[0], batch.stepper


def _three_ways(pair, policy, budget, ids, steps):
    """The request alone on the CPU, and on the GPU with graphs on and off (the GPU steppers checked):
    (plain, graphed, eager results, the graphed run's stepper)."""
    cpu, gpu = pair
    plain, _ = _alone(cpu, policy, budget, ids, steps)
    graphed, graph_stepper = _alone(gpu, policy, budget, ids, steps, use_graphs=True)
    assert graph_stepper.use_graphs and graph_stepper.captures >= 1 and graph_stepper.replays == steps - 1
    assert {key[0] for key in graph_stepper._entries} == {1}  # the batch bucket of one
    eager, stepper = _alone(gpu, policy, budget, ids, steps, use_graphs=False)
    assert stepper.captures == 0 and stepper.replays == 0
    return plain, graphed, eager, graph_stepper


SINGLE = [(None, None), ("snapkv", "20%"), ("ada-snapkv", "20%"), ("laprox", "10%"), ("h2o", "64"),
          ("tova", "64"), ("streaming", "64")]


@pytest.mark.parametrize("policy,budget", SINGLE, ids=[p or "full" for p, _ in SINGLE])
def test_gpu_batch_of_one_matches_cpu_float32(models, policy, budget):
    ids = torch.randint(3, 128, (700,), generator=torch.Generator().manual_seed(0)).tolist()
    plain, graphed, eager, _ = _three_ways(models, policy, budget, ids, 40)
    assert graphed.token_ids == eager.token_ids == plain.token_ids and len(plain.token_ids) == 40
    assert graphed.kv_entries_kept == eager.kv_entries_kept == plain.kv_entries_kept
    # kvx generate's own entry point (run_alone: a pool sized to the request's worst case) gives the same
    pol, bud = _spec(policy, budget)
    res = generate(ModelRunner(models[1], StubTokenizer()), ids, max_tokens=40, policy=pol, budget=bud,
                   stop_at_eos=False)
    assert res.token_ids == graphed.token_ids and res.kv_entries_kept == graphed.kv_entries_kept


WINDOWED = [(None, None), ("snapkv", "30%"), ("tova", "30%")]


@pytest.mark.parametrize("policy,budget", WINDOWED, ids=[p or "full" for p, _ in WINDOWED])
def test_sliding_window_batch_of_one_matches_cpu(mistral, policy, budget):
    """A sliding-window model (window 8) decodes through the captured step: the window is applied by the
    paged kernel from the pool's positions. Tokens equal eager on the GPU and the CPU."""
    ids = torch.randint(3, 128, (300,), generator=torch.Generator().manual_seed(6)).tolist()
    plain, graphed, eager, _ = _three_ways(mistral, policy, budget, ids, 40)
    assert graphed.token_ids == eager.token_ids == plain.token_ids


def test_graph_is_captured_once_and_replayed(models):
    """A full-cache request reserves its whole answer up front: its block tables never outgrow their width
    bucket, so one capture serves every step."""
    _, gpu = models
    ids = torch.randint(3, 128, (297,), generator=torch.Generator().manual_seed(2)).tolist()
    res, stepper = _alone(gpu, None, None, ids, 50)
    assert len(res.token_ids) == 50
    assert stepper.captures == 1 and stepper.replays == 49


@pytest.mark.parametrize("policy", ["h2o", "tova", "streaming", "ahakv"])
def test_decode_time_eviction_replays_one_graph(models, policy):
    """Evicting while decoding keeps the captured step: the kept entries move inside their own blocks and
    the tables keep their width, so the rounds replay one graph; tokens equal eager and the CPU."""
    ids = torch.randint(3, 128, (500,), generator=torch.Generator().manual_seed(5)).tolist()
    steps = 60  # past DECODE_SLACK several times: a few eviction rounds
    assert steps > 3 * DECODE_SLACK
    plain, graphed, eager, stepper = _three_ways(models, policy, "10%", ids, steps)
    assert graphed.token_ids == eager.token_ids == plain.token_ids
    assert graphed.kv_entries_kept == eager.kv_entries_kept == plain.kv_entries_kept
    assert graphed.timings.decode_evict_s > 0
    assert stepper.captures == 1


def test_gpu_batch_matches_cpu_batch_float32(models):
    """The batched engine on CUDA (Triton paged decode attention) against the same batch on the CPU."""
    cpu, gpu = models
    g = torch.Generator().manual_seed(3)
    specs = [(None, None), ("snapkv", "20%"), ("h2o", "25%"), ("tova", "30%"), ("ada-snapkv", "10%"), ("laprox", "10%")]
    prompts = [torch.randint(3, 128, (int(n),), generator=g).tolist() for n in torch.randint(100, 700, (6,), generator=g)]
    outs = []
    for model in (cpu, gpu):
        # The same split prefill on both devices (pieces of 256: most prompts take several).
        batch = BatchEngine(ModelRunner(model, StubTokenizer()), kv_memory=64 << 20, max_batch=6, prefill_step=256)
        seqs = [batch.submit(GenerationRequest(prompt_ids=ids, max_tokens=30, policy=build_policy(p) if p else None,
                                               budget=parse_budget(b) if b else None))
                for ids, (p, b) in zip(prompts, specs)]
        batch.run()
        outs.append([s.results[0].token_ids for s in seqs])
        assert batch.pool.num_used == 0
    assert outs[0] == outs[1]


def test_gpu_batch_graph_path_equals_eager(models):
    """The batched step replayed as CUDA graphs (padded to batch buckets, tables in static buffers) against
    the same batch decoded eagerly, with decode-time eviction (h2o, tova, ahakv, streaming) inside it."""
    _, gpu = models
    g = torch.Generator().manual_seed(4)
    specs = [(None, None), ("h2o", "25%"), ("tova", "30%"), ("ahakv", "25%"), ("streaming", "20%"),
             ("snapkv", "10%"), ("ada-snapkv", "15%")]
    lengths = [40, 9, 33, 21, 14, 5, 27]  # the batch shrinks through the buckets 8, 4, 2, 1
    prompts = [torch.randint(3, 128, (int(n),), generator=g).tolist() for n in torch.randint(100, 700, (7,), generator=g)]
    outs, steppers = [], []
    for graphs in (True, False):
        batch = BatchEngine(ModelRunner(gpu, StubTokenizer(), use_graphs=graphs), kv_memory=64 << 20, max_batch=8)
        seqs = [batch.submit(GenerationRequest(prompt_ids=ids, max_tokens=m, policy=build_policy(p) if p else None,
                                               budget=parse_budget(b) if b else None))
                for ids, (p, b), m in zip(prompts, specs, lengths)]
        batch.run()
        outs.append([s.results[0].token_ids for s in seqs])
        steppers.append(batch.stepper)
        assert batch.pool.num_used == 0
    assert outs[0] == outs[1]
    assert steppers[0].captures >= 4 and steppers[0].replays >= 2 * steppers[0].captures
    assert steppers[1].captures == 0

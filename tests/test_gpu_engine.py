"""The GPU path end to end (skipped without CUDA): Triton kernels + CUDA-graph decode against the CPU."""

from __future__ import annotations

import pytest
import torch

from checkpoints import make_checkpoint
from kvx.models.transformer import Transformer
from kvx.policies import build_policy, parse_budget
from kvx.runtime.engine import Engine
from test_engine import StubTokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path, _ = make_checkpoint("llama_gqa_llama3", tmp_path_factory.mktemp("ck"), max_position_embeddings=4096)
    return Transformer.from_pretrained(path), Transformer.from_pretrained(path, device="cuda")


@pytest.mark.parametrize("policy,budget", [(None, None), ("snapkv", "20%"), ("ada-snapkv", "20%"), ("laprox", "10%"),
                                           ("h2o", "64"), ("tova", "64"), ("streaming", "64")])
def test_gpu_generation_matches_cpu_float32(models, policy, budget):
    cpu, gpu = models
    ids = torch.randint(3, 128, (700,), generator=torch.Generator().manual_seed(0)).tolist()
    pol = (lambda: build_policy(policy)) if policy else (lambda: None)
    bud = parse_budget(budget) if budget else None
    a = Engine(cpu, StubTokenizer(), pol(), bud).generate(ids, max_tokens=40)
    b = Engine(gpu, StubTokenizer(), pol(), bud, use_graphs=True).generate(ids, max_tokens=40)
    c = Engine(gpu, StubTokenizer(), pol(), bud, use_graphs=False).generate(ids, max_tokens=40)
    assert b.token_ids == c.token_ids
    assert b.token_ids == a.token_ids
    assert b.kv_entries_kept == a.kv_entries_kept


@pytest.mark.parametrize("policy,budget", [(None, None), ("snapkv", "30%"), ("tova", "30%")])
def test_sliding_window_graph_matches_cpu(tmp_path_factory, policy, budget):
    """A sliding-window model (window 8) decodes through the captured graph: the window is applied by the
    decode kernel. Tokens equal eager on the GPU and the CPU."""
    path, _ = make_checkpoint("mistral", tmp_path_factory.mktemp("mistral"), max_position_embeddings=4096)
    cpu, gpu = Transformer.from_pretrained(path), Transformer.from_pretrained(path, device="cuda")
    ids = torch.randint(3, 128, (300,), generator=torch.Generator().manual_seed(6)).tolist()
    pol = (lambda: build_policy(policy)) if policy else (lambda: None)
    bud = parse_budget(budget) if budget else None
    a = Engine(cpu, StubTokenizer(), pol(), bud).generate(ids, max_tokens=40)
    b = Engine(gpu, StubTokenizer(), pol(), bud, use_graphs=True).generate(ids, max_tokens=40)
    c = Engine(gpu, StubTokenizer(), pol(), bud, use_graphs=False).generate(ids, max_tokens=40)
    assert b.token_ids == c.token_ids == a.token_ids


def test_graph_is_captured_once_and_replayed(models):
    _, gpu = models
    engine = Engine(gpu, StubTokenizer(), use_graphs=True)
    ids = list(range(3, 300))
    req = engine.new_request(capacity=len(ids) + 64)
    logits = engine.prefill(req, ids)
    engine.decode(req, logits, __import__("kvx.runtime.sampling", fromlist=["SamplingParams"]).SamplingParams(), 50,
                  stop_at_eos=False)
    assert req.graph is not None and req.graph.captures == 1


@pytest.mark.parametrize("policy", ["h2o", "tova", "streaming", "ahakv"])
def test_decode_time_eviction_replays_one_graph(models, policy):
    """Evicting while decoding keeps the captured graph: the kept entries go back into the same pools."""
    from kvx.runtime.sampling import SamplingParams

    _, gpu = models
    ids = torch.randint(3, 128, (500,), generator=torch.Generator().manual_seed(5)).tolist()
    outs = []
    for graphs in (True, False):
        engine = Engine(gpu, StubTokenizer(), build_policy(policy), parse_budget("10%"), use_graphs=graphs)
        req = engine.new_request(capacity=len(ids), policy=engine.policy, budget=engine.budget)
        logits = engine.prefill(req, ids, engine.stats_request(req, len(ids)))
        engine.compress(req, headroom=60)
        out, _, _ = engine.decode(req, logits, SamplingParams(), 60, stop_at_eos=False)
        outs.append(out)
        if graphs:
            assert req.graph is not None and req.graph.captures == 1 and req.timings.decode_evict_s > 0
    assert outs[0] == outs[1]


def test_gpu_batch_matches_cpu_batch_float32(models):
    """The batched engine on CUDA (Triton paged decode attention) against the same batch on the CPU."""
    from kvx.runtime.batch import BatchEngine
    from kvx.runtime.sequence import GenerationRequest

    cpu, gpu = models
    g = torch.Generator().manual_seed(3)
    specs = [(None, None), ("snapkv", "20%"), ("h2o", "25%"), ("tova", "30%"), ("ada-snapkv", "10%"), ("laprox", "10%")]
    prompts = [torch.randint(3, 128, (int(n),), generator=g).tolist() for n in torch.randint(100, 700, (6,), generator=g)]
    outs = []
    for model in (cpu, gpu):
        # The same split prefill on both devices (pieces of 256: most prompts take several).
        batch = BatchEngine(Engine(model, StubTokenizer()), kv_memory=64 << 20, max_batch=6, prefill_step=256)
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
    from kvx.runtime.batch import BatchEngine
    from kvx.runtime.sequence import GenerationRequest

    _, gpu = models
    g = torch.Generator().manual_seed(4)
    specs = [(None, None), ("h2o", "25%"), ("tova", "30%"), ("ahakv", "25%"), ("streaming", "20%"),
             ("snapkv", "10%"), ("ada-snapkv", "15%")]
    lengths = [40, 9, 33, 21, 14, 5, 27]  # the batch shrinks through the buckets 8, 4, 2, 1
    prompts = [torch.randint(3, 128, (int(n),), generator=g).tolist() for n in torch.randint(100, 700, (7,), generator=g)]
    outs, steppers = [], []
    for graphs in (True, False):
        batch = BatchEngine(Engine(gpu, StubTokenizer(), use_graphs=graphs), kv_memory=64 << 20, max_batch=8)
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

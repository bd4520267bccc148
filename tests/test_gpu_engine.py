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
                                           ("h2o", "64"), ("tova", "64")])
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


def test_graph_is_captured_once_and_replayed(models):
    _, gpu = models
    engine = Engine(gpu, StubTokenizer(), use_graphs=True)
    ids = list(range(3, 300))
    req = engine.new_request(capacity=len(ids) + 64)
    logits = engine.prefill(req, ids)
    engine.decode(req, logits, __import__("kvx.runtime.sampling", fromlist=["SamplingParams"]).SamplingParams(), 50,
                  stop_at_eos=False)
    assert req.graph is not None and req.graph.captures == 1

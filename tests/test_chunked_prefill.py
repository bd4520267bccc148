"""Chunked prefill with interleaved eviction: the cache peaks near budget + chunk, not at the prompt."""

from __future__ import annotations

import pytest
import torch

from checkpoints import make_checkpoint
from kvx.errors import KvxError
from kvx.models.transformer import Transformer
from kvx.policies import build_policy, parse_budget
from kvx.runtime.engine.model_runner import ModelRunner
from test_engine import StubTokenizer
from kvx.runtime.engine.batch_engine import generate
from runtime_helpers import new_request, run_steps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_checkpoint("llama_gqa_llama3", tmp_path_factory.mktemp("ck"), max_position_embeddings=2048)
    return Transformer.from_pretrained(path)


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("policy", ["snapkv", "ada-snapkv", "laprox", "ahakv", "knorm", "streaming"])
def test_peak_stays_near_budget_plus_chunk(tiny, policy):
    cfg = tiny.config
    n, chunk, budget = 900, 100, parse_budget("10%")
    ids = prompt(n)
    chunked = ModelRunner(tiny, StubTokenizer(), build_policy(policy), budget, prefill_chunk=chunk)
    whole = ModelRunner(tiny, StubTokenizer(), build_policy(policy), budget)
    a = generate(chunked, ids, max_tokens=4)
    b = generate(whole, ids, max_tokens=4)
    entry = chunked.entry_bytes()
    heads = cfg.num_layers * cfg.num_kv_heads
    target = budget.per_head(n)
    # the whole-prompt run holds the full cache while prefilling; the chunked one about target + chunk
    assert b.kv_bytes_peak >= heads * n * entry
    B = 32  # the engine's block: a segment holds whole blocks
    assert a.kv_bytes_peak <= heads * -(-(target + chunk) // B) * B * entry
    # after the final selection both keep exactly the budget's entries
    assert a.kv_entries_kept == b.kv_entries_kept == budget.total_entries(n, cfg.num_layers, cfg.num_kv_heads) + heads * 4 - heads
    assert a.generated_tokens == 4


def test_kept_positions_are_sorted_and_include_the_recent_window(tiny):
    n, chunk = 700, 128
    engine = ModelRunner(tiny, StubTokenizer(), build_policy("snapkv"), parse_budget("64"), prefill_chunk=chunk)
    req = new_request(engine, capacity=chunk, policy=engine.policy, budget=engine.budget)
    _, final = run_steps(engine.prefill_chunks(req, prompt(n, 1), chunk))
    engine.compress(req, headroom=0, budget=final)
    for lc in req.cache.layers:
        for g in range(req.cache.num_kv_heads):
            pos = lc.head(g)[2].tolist()
            assert pos == sorted(pos) and len(set(pos)) == len(pos)
            assert pos[-32:] == list(range(n - 32, n))  # SnapKV's observation window survives
            assert len(pos) == 64


def test_chunk_larger_than_prompt_is_a_plain_prefill(tiny):
    ids = prompt(200)
    a = generate(ModelRunner(tiny, StubTokenizer(), build_policy("snapkv"), parse_budget("20%"), prefill_chunk=4096), ids, max_tokens=6)
    b = generate(ModelRunner(tiny, StubTokenizer(), build_policy("snapkv"), parse_budget("20%")), ids, max_tokens=6)
    assert a.token_ids == b.token_ids


def test_policies_that_need_every_query_refuse_chunking(tiny):
    engine = ModelRunner(tiny, StubTokenizer(), build_policy("h2o"), parse_budget("10%"), prefill_chunk=100)
    with pytest.raises(KvxError, match="prefill-chunk"):
        generate(engine, prompt(500), max_tokens=2)

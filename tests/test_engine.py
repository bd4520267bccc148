"""The runtime: ragged cache operations, full-cache generation parity with transformers, modes, sampling."""

from __future__ import annotations

import pytest
import torch

from checkpoints import make_checkpoint
from kvx.kernels import reference as ref
from kvx.models.transformer import Transformer
from kvx.policies import build_policy, parse_budget
from kvx.runtime.cache.paged_cache import PagedKVCache
from kvx.runtime.cache.pool import BlockPool
from kvx.runtime.engine.model_runner import ModelRunner
from kvx.runtime.engine.sampling import SamplingParams, make_generator, sample
from kvx.runtime.engine.batch_engine import generate, generate_agnostic


class StubTokenizer:
    """Enough of kvx's Tokenizer for engine tests on tiny checkpoints (no tokenizer.json there)."""

    eos_token_ids: list[int] = []

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))

    def stream_decoder(self):
        tok = self

        class S:
            def push(self, i):
                return f"{i} "

            def flush(self):
                return ""

        return S()


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                            pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("variant", ["llama_gqa_llama3", "qwen2", "qwen3", "mistral"])
def test_full_cache_generation_matches_transformers(tmp_path, variant):
    path, hf = make_checkpoint(variant, tmp_path)
    model = Transformer.from_pretrained(path)
    engine = ModelRunner(model, StubTokenizer())
    ids = torch.randint(3, 128, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    result = generate(engine, ids, SamplingParams(), max_tokens=12)
    assert result.token_ids == hf_greedy(hf, ids, 12)
    assert result.generated_tokens == 12 and result.finish_reason == "length"


BLOCK = 8


def _random_cache(hkv=3, d=8, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = BlockPool(64, BLOCK, d, torch.float32, "cpu")
    cache = PagedKVCache(pool, num_layers=2, num_kv_heads=hkv, capacity=n)
    ks = [torch.randn(hkv, n, d, generator=g) for _ in range(2)]
    vs = [torch.randn(hkv, n, d, generator=g) for _ in range(2)]
    for layer in range(2):
        cache.append(layer, ks[layer], vs[layer], torch.arange(n))
    return cache, ks, vs, g


def test_compressed_attention_equals_masked_full_attention():
    hkv, d, n, G = 3, 8, 40, 4
    cache, ks, vs, g = _random_cache(hkv, d, n)
    # very different kept counts per head, one head empty
    counts = [[25, 0, 7], [40, 1, 13]]
    keep = [[torch.sort(torch.randperm(n, generator=g)[:c]).values for c in layer] for layer in counts]
    cache.compact(keep, headroom=5)
    q = torch.randn(hkv * G, d, generator=g)
    for layer in range(2):
        lc = cache.layers[layer]
        assert lc.lengths == counts[layer]
        width = max(len(t) for t in lc.tables)
        tables = torch.tensor([t + [cache.pool.scratch] * (width - len(t)) for t in lc.tables], dtype=torch.int32)
        out = ref.paged_decode_attention(q.view(hkv, G, d), cache.pool.k, cache.pool.v, tables,
                                         torch.tensor(lc.lengths, dtype=torch.int32), scale=0.3).reshape(hkv * G, d)
        for h in range(hkv * G):
            kv = h // G
            idx = keep[layer][kv]
            if idx.numel() == 0:
                assert torch.all(out[h] == 0)
                continue
            # masked reference: full attention over all n keys with evicted ones masked out
            logits = (q[h] @ ks[layer][kv].T) * 0.3
            mask = torch.full((n,), float("-inf"))
            mask[idx] = 0
            expected = torch.softmax(logits + mask, -1) @ vs[layer][kv]
            torch.testing.assert_close(out[h], expected, rtol=1e-5, atol=1e-5)
        # positions follow the kept tokens, in order
        for kv in range(hkv):
            assert lc.head(kv)[2].tolist() == keep[layer][kv].tolist()


def test_bytes_follow_kept_entries_and_headroom():
    hkv, d, n = 3, 8, 40
    cache, *_ = _random_cache(hkv, d, n)
    full = cache.bytes_allocated()
    block_bytes = 2 * BLOCK * d * 4
    assert full == 2 * hkv * -(-n // BLOCK) * block_bytes  # whole blocks of the pool
    keep = [[torch.arange(c) for c in (4, 2, 6)], [torch.arange(c) for c in (1, 1, 1)]]
    cache.compact(keep, headroom=3)
    kept = 4 + 2 + 6 + 3
    assert cache.total_entries() == kept
    # each segment holds the blocks for kept + headroom entries, no more
    blocks = sum(-(-(c + 3) // BLOCK) for c in (4, 2, 6, 1, 1, 1))
    assert cache.bytes_allocated() == blocks * block_bytes
    assert cache.pool.num_used == blocks
    assert cache.bytes_used() == kept * 2 * d * 4


def test_append_after_compaction_and_growth():
    hkv, d, n = 2, 4, 10
    cache, ks, vs, g = _random_cache(hkv, d, n)
    cache.compact([[torch.tensor([1, 5]), torch.tensor([0, 3, 9])]] * 2, headroom=1)
    cache.make_room(4, headroom=2)  # grows: capacity was kept + 1
    knew, vnew = torch.randn(hkv, 4, d), torch.randn(hkv, 4, d)
    cache.append(0, knew, vnew, torch.arange(10, 14))
    k0, v0, p0 = cache.layers[0].head(0)
    assert p0.tolist() == [1, 5, 10, 11, 12, 13]
    torch.testing.assert_close(k0[2:], knew[0])
    torch.testing.assert_close(k0[:2], ks[0][0, [1, 5]])
    k1, _, p1 = cache.layers[0].head(1)
    assert p1.tolist() == [0, 3, 9, 10, 11, 12, 13]


def test_agnostic_full_cache_equals_aware(tmp_path):
    path, _ = make_checkpoint("llama_gqa_llama3", tmp_path)
    engine = ModelRunner(Transformer.from_pretrained(path), StubTokenizer())
    g = torch.Generator().manual_seed(3)
    ctx = torch.randint(3, 128, (30,), generator=g).tolist()
    q1 = torch.randint(3, 128, (5,), generator=g).tolist()
    q2 = torch.randint(3, 128, (7,), generator=g).tolist()
    res = generate_agnostic(engine, ctx, [q1, q2, q1], max_tokens=8)
    assert res[0].token_ids == generate(engine, ctx + q1, max_tokens=8).token_ids
    assert res[1].token_ids == generate(engine, ctx + q2, max_tokens=8).token_ids
    # the cache was restored between questions: asking q1 again gives the same answer
    assert res[2].token_ids == res[0].token_ids



@pytest.mark.parametrize("name,budget", [("snapkv", "30%"), ("h2o", "30%"), ("tova", "25%"), ("ahakv", "30%")])
def test_each_question_sees_the_context_as_compressed(tmp_path, name, budget):
    """Between questions the compressed context comes back as it was, decode-time eviction or not: every
    answer equals the one its question gets when asked alone."""
    path, _ = make_checkpoint("qwen2", tmp_path)
    engine = ModelRunner(Transformer.from_pretrained(path), StubTokenizer())
    g = torch.Generator().manual_seed(11)
    ctx = torch.randint(3, 128, (90,), generator=g).tolist()
    qs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (4, 9, 6)]
    run = lambda questions: generate_agnostic(engine, ctx, questions, max_tokens=24, policy=build_policy(name),
                                                     budget=parse_budget(budget))
    together = run(qs + [qs[0]])
    for q, res in zip(qs + [qs[0]], together):
        alone = run([q])[0]
        assert res.token_ids == alone.token_ids
        assert res.kv_entries_kept == alone.kv_entries_kept


def test_sampling_is_deterministic_for_a_seed():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7)
    a = [sample(logits, p, g) for g in [make_generator(p, torch.device("cpu"))] for _ in range(20)]
    b = [sample(logits, p, g) for g in [make_generator(p, torch.device("cpu"))] for _ in range(20)]
    assert a == b
    assert len(set(a)) > 1
    allowed = set(torch.topk(logits, 20).indices.tolist())
    assert set(a) <= allowed
    assert sample(logits, SamplingParams(), None) == int(torch.argmax(logits))


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = SamplingParams(temperature=1.0, top_p=0.7, seed=0)
    g = make_generator(p, torch.device("cpu"))
    seen = {sample(logits, p, g) for _ in range(200)}
    assert seen == {0, 1}


@pytest.mark.parametrize("temperature,top_p", [(1e-300, 1.0), (1e-30, 1e-300), (1.0, 1e-300), (1e-6, 0.5)])
def test_sampling_too_sharp_for_all_but_the_top_token_picks_it(temperature, top_p):
    """A temperature or nucleus so small that only the most likely token can be drawn draws it (once a
    float32 NaN from dividing by the temperature)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, generator=g) * 5
    p = SamplingParams(temperature=temperature, top_p=top_p, seed=1)
    gen = make_generator(p, torch.device("cpu"))
    assert {sample(logits, p, gen) for _ in range(20)} == {int(torch.argmax(logits))}

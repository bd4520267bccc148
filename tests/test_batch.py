"""Continuous batching: a batch of N equals N batches of one; the pool accounts every block.

"Alone" is a batch of one (`generate` / `generate_agnostic`: run_alone, what `kvx generate` runs, in a pool
sized to the request's worst case); the batch is the BatchEngine over one shared paged pool, with requests
of different policies, budgets and lengths in the same decode steps. CPU, float32, greedy.
"""

from __future__ import annotations

import random

import pytest

from checkpoints import make_checkpoint
from kvx.errors import KvxError
from kvx.models.transformer import Transformer
from kvx.policies import build_policy, parse_budget
from kvx.runtime.engine.batch_engine import BatchEngine
from kvx.runtime.engine.model_runner import ModelRunner
from kvx.runtime.engine.sampling import SamplingParams
from kvx.runtime.engine.sequence import CANCELLED, FAILED, FINISHED, GenerationRequest
from test_compression import one_thread  # noqa: F401  (autouse: one intra-op thread, see there)
from test_engine import StubTokenizer
from kvx.runtime.engine.batch_engine import generate, generate_agnostic

# One policy of every family: window-scored (snapkv), accumulated + decode-time (h2o), decode-time last
# row (tova), decode-time recent queries (ahakv), positional (streaming), head-adaptive (ada-snapkv),
# model-wide (laprox: global top-K), query-moment (expected-attention).
FAMILIES = [("snapkv", "20%"), ("h2o", "20%"), ("tova", "30%"), ("ahakv", "20%"), ("streaming", "25%"),
            ("ada-snapkv", "10%"), ("laprox", "15%"), ("expected-attention", "20%"), ("full", None)]


@pytest.fixture(scope="module", params=["qwen2", "mistral"])
def engine(request, tmp_path_factory):
    # mistral: a sliding window (8) shorter than every prompt, so the paged attention's window is exercised.
    path, _ = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param), max_position_embeddings=4096)
    return ModelRunner(Transformer.from_pretrained(path), StubTokenizer())


def _ids(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randrange(3, 128) for _ in range(rng.randrange(lo, hi))]


def _policy(name):
    return None if name == "full" else build_policy(name)


def _alone(engine, ids, name, budget, max_tokens, params=SamplingParams()):
    b = None if budget is None else parse_budget(budget)
    return generate(engine, ids, params, max_tokens, policy=_policy(name), budget=b)


def _request(ids, name, budget, max_tokens, **kw):
    return GenerationRequest(prompt_ids=ids, max_tokens=max_tokens, policy=_policy(name),
                             budget=None if budget is None else parse_budget(budget), **kw)


@pytest.mark.parametrize("name,budget", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_each_family_in_a_batch_equals_alone(engine, name, budget):
    rng = random.Random(sum(map(ord, name)))
    prompts = [_ids(rng, 40, 260) for _ in range(4)]
    want = [_alone(engine, ids, name, budget, 24).token_ids for ids in prompts]
    batch = BatchEngine(engine, kv_memory=32 << 20, max_batch=4)
    seqs = [batch.submit(_request(ids, name, budget, 24)) for ids in prompts]
    batch.run()
    assert [s.results[0].token_ids for s in seqs] == want
    assert batch.pool.num_used == 0 and batch.pool.reserved == 0


def test_a_batch_mixing_policies_and_budgets_equals_each_alone(engine):
    rng = random.Random(7)
    specs = FAMILIES + [("snapkv", "5%"), ("h2o", "40%"), ("ada-snapkv", "64"), ("tova", "50%")]
    prompts = [_ids(rng, 30, 300) for _ in specs]
    temps = [SamplingParams(temperature=0.8, seed=i) if i % 4 == 3 else SamplingParams() for i in range(len(specs))]
    want = [_alone(engine, ids, n, b, 20, p) for ids, (n, b), p in zip(prompts, specs, temps)]
    batch = BatchEngine(engine, kv_memory=32 << 20, max_batch=8)
    seqs = [batch.submit(_request(ids, n, b, 20, params=p)) for ids, (n, b), p in zip(prompts, specs, temps)]
    max_running = 0
    while batch.has_work:
        batch.step()
        max_running = max(max_running, len(batch.scheduler.running))
    assert max_running == 8  # they really shared decode steps
    for s, w in zip(seqs, want):
        r = s.results[0]
        assert r.token_ids == w.token_ids
        assert r.kv_entries_kept == w.kv_entries_kept  # the same entries kept
        assert r.lengths == w.lengths  # ... per (layer, kv head)


@pytest.mark.parametrize("name,budget", [("full", None), ("snapkv", "25%"), ("h2o", "25%"), ("tova", "30%"),
                                         ("ahakv", "25%"), ("streaming", "25%")])
def test_question_agnostic_requests_in_a_batch_equal_alone(engine, name, budget):
    rng = random.Random(3)
    cases = [(_ids(rng, 80, 200), [_ids(rng, 3, 9) for _ in range(3)]) for _ in range(3)]
    b = None if budget is None else parse_budget(budget)
    want = [[r.token_ids for r in generate_agnostic(engine, ctx, qs, SamplingParams(), 12, policy=_policy(name), budget=b)]
            for ctx, qs in cases]
    batch = BatchEngine(engine, kv_memory=32 << 20, max_batch=3)
    seqs = [batch.submit(GenerationRequest(context_ids=ctx, question_ids=qs, max_tokens=12, policy=_policy(name),
                                           budget=b)) for ctx, qs in cases]
    batch.run()
    assert [[r.token_ids for r in s.results] for s in seqs] == want
    assert batch.pool.num_used == 0


def test_chunked_prefill_in_a_batch_equals_alone(tmp_path):
    path, _ = make_checkpoint("qwen2", tmp_path, max_position_embeddings=4096)
    engine = ModelRunner(Transformer.from_pretrained(path), StubTokenizer(), prefill_chunk=64)
    rng = random.Random(5)
    prompts = [_ids(rng, 150, 400) for _ in range(3)]
    want = [_alone(engine, ids, "snapkv", "10%", 16).token_ids for ids in prompts]
    batch = BatchEngine(engine, kv_memory=8 << 20, max_batch=3)
    seqs = [batch.submit(_request(ids, "snapkv", "10%", 16)) for ids in prompts]
    batch.run()
    assert [s.results[0].token_ids for s in seqs] == want


def test_running_sequences_decode_between_the_chunks_of_a_long_prefill(tmp_path):
    path, _ = make_checkpoint("qwen2", tmp_path, max_position_embeddings=4096)
    engine = ModelRunner(Transformer.from_pretrained(path), StubTokenizer(), prefill_chunk=64)
    rng = random.Random(9)
    batch = BatchEngine(engine, kv_memory=8 << 20, max_batch=4)
    short = batch.submit(_request(_ids(rng, 20, 30), "snapkv", "50%", 40, stop_at_eos=False))
    batch.step()  # short is prefilled (one chunk) and takes its first step
    long = batch.submit(_request(_ids(rng, 600, 601), "snapkv", "10%", 4))
    during = []
    for _ in range(100):
        batch.step()
        if long.state == "prefill" or long.prefill_units is not None:
            during.append(len(short.out_ids))
        if long.state != "prefill" and long.prefill_units is None:
            break
    assert len(during) >= 8 and during[-1] - during[0] >= 7  # ~10 chunks, a token of short's after each
    batch.run()
    assert long.results[0].token_ids == _alone(engine, long.request.prompt_ids, "snapkv", "10%", 4).token_ids


def test_pool_accounting_under_random_load(tmp_path):
    """Many randomly sized requests (compressed, full, decode-time eviction, agnostic), some cancelled at
    random and some steps failing on purpose (an exception inside a prefill or a decode step), through a
    pool far too small for all at once: the pool never exceeds its cap, no sequence holds more than it
    reserved, admission waits instead of overflowing, and every block comes back."""
    path, _ = make_checkpoint("qwen2", tmp_path, max_position_embeddings=4096)
    engine = ModelRunner(Transformer.from_pretrained(path), StubTokenizer())
    rng = random.Random(11)
    batch = BatchEngine(engine, kv_memory=6 << 20, max_batch=6, block_size=16)
    pool = batch.pool
    seqs = []
    for i in range(40):
        name, budget = rng.choice(FAMILIES)
        if rng.random() < 0.2:
            req = GenerationRequest(context_ids=_ids(rng, 50, 300), question_ids=[_ids(rng, 2, 6) for _ in range(2)],
                                    max_tokens=rng.randrange(0, 20), policy=_policy(name),
                                    budget=None if budget is None else parse_budget(budget))
        else:
            req = _request(_ids(rng, 20, 400), name, budget, rng.randrange(0, 40))
        seqs.append(batch.submit(req))
    waited = False
    real_prefill, real_step = engine.prefill, batch.stepper.step

    def failing(real):
        def call(*args, **kwargs):
            if rng.random() < 0.03:
                raise RuntimeError("injected failure")
            return real(*args, **kwargs)
        return call

    engine.prefill, batch.stepper.step = failing(real_prefill), failing(real_step)  # this test's own instances
    for _ in range(5000):
        if not batch.has_work:
            break
        batch.step()
        assert pool.num_used <= pool.num_blocks and pool.reserved <= pool.num_blocks
        for s in batch.scheduler.running:
            if s.req is not None:
                held = s.req.cache.blocks_held() + (s.snapshot.cache.blocks_held()
                                                    if s.snapshot and s.snapshot.cache is not s.req.cache else 0)
                assert held <= s.reserved
        waited |= bool(batch.scheduler.waiting) and len(batch.scheduler.running) < 6
        if rng.random() < 0.05 and batch.scheduler.running:
            batch.cancel(rng.choice(batch.scheduler.running))
    assert not batch.has_work
    assert waited  # the pool, not max_batch, held requests back at some point
    assert pool.num_used == 0 and pool.reserved == 0 and pool.num_free == pool.num_blocks
    assert {s.state for s in seqs} <= {FINISHED, CANCELLED, FAILED}
    assert all(s.internal and "injected failure" in s.error for s in seqs if s.state == FAILED)
    assert batch.internal_errors >= 1 and sum(s.state == FAILED for s in seqs) >= 1
    assert sum(s.state == FINISHED for s in seqs) >= 15


def test_a_request_larger_than_the_pool_is_refused_at_once(tmp_path):
    path, _ = make_checkpoint("qwen2", tmp_path, max_position_embeddings=4096)
    model = Transformer.from_pretrained(path)
    long_prompt = list(range(3, 120)) * 8
    batch = BatchEngine(ModelRunner(model, StubTokenizer()), kv_memory=64 << 10, max_batch=2)
    for name, budget in [("full", None), ("snapkv", "5%")]:  # without chunks, a prefill holds the prompt
        with pytest.raises(KvxError, match="more than the whole pool"):
            batch.submit(_request(long_prompt, name, budget, 10))
    # with chunked prefill the same prompt, compressed, peaks near budget + chunk and fits
    chunked = BatchEngine(ModelRunner(model, StubTokenizer(), prefill_chunk=64), kv_memory=64 << 10, max_batch=2)
    seq = chunked.submit(_request(long_prompt, "snapkv", "5%", 4))
    chunked.run()
    assert seq.state == FINISHED and chunked.pool.num_used == 0


def test_stop_strings_end_the_answer_before_the_stop(tmp_path):
    path, _ = make_checkpoint("qwen2", tmp_path, max_position_embeddings=4096)
    engine = ModelRunner(Transformer.from_pretrained(path), StubTokenizer())
    ids = list(range(10, 60))
    full = _alone(engine, ids, "full", None, 12)
    text = "".join(f"{t} " for t in full.token_ids)  # the StubTokenizer writes "id " per token
    stop = f"{full.token_ids[2]} {full.token_ids[3]}"
    pieces = []
    batch = BatchEngine(engine, kv_memory=8 << 20)
    seq = batch.submit(_request(ids, "full", None, 12, stop=(stop, "never"), on_text=lambda s, q, t: pieces.append(t)))
    batch.run()
    r = seq.results[0]
    assert r.finish_reason == "stop"
    assert r.text == text[:text.find(stop)] and "".join(pieces) == r.text
    assert r.generated_tokens <= 4


def test_the_plans_concurrency_is_what_the_engine_reaches(tmp_path):
    """`kvx profile --plan`'s batched-engine rows (memory.pool_capacity) against a real run: in the same
    pool the engine runs exactly that many uncompressed sequences at once, and at least that many compressed
    ones (the plan bounds each segment's waste by a whole block; a real segment often wastes less)."""
    from kvx.runtime.memory import pool_capacity

    path, _ = make_checkpoint("qwen2", tmp_path, max_position_embeddings=4096)
    engine = ModelRunner(Transformer.from_pretrained(path), StubTokenizer())
    cfg, n, gen, memory = engine.config, 300, 40, 400 << 10
    rng = random.Random(2)
    for name, budget in [("full", None), ("snapkv", "10%")]:
        b = None if budget is None else parse_budget(budget)
        want_full, want_compressed = pool_capacity(cfg, n, b or parse_budget("100%"), 4, gen, memory)
        batch = BatchEngine(engine, kv_memory=memory, max_batch=64)
        for _ in range(16):
            batch.submit(GenerationRequest(prompt_ids=[rng.randrange(3, 128) for _ in range(n)], max_tokens=gen,
                                           policy=_policy(name), budget=b, stop_at_eos=False))
        batch.run()
        if budget is None:
            assert batch.max_running == want_full
        else:
            assert want_compressed >= 3 * want_full
            assert batch.max_running >= want_compressed


def test_kvzip_in_a_batch_equals_alone(tmp_path):
    """KVzip's reconstruction passes run inside the batched engine's prefill unit and leave the same cache."""
    from test_kvzip import ReconstructionTokenizer

    path, _ = make_checkpoint("qwen2", tmp_path, max_position_embeddings=4096)
    engine = ModelRunner(Transformer.from_pretrained(path), ReconstructionTokenizer())
    rng = random.Random(4)
    cases = [(_ids(rng, 100, 220), [_ids(rng, 3, 8) for _ in range(2)]) for _ in range(3)]
    b = parse_budget("20%")
    want = [[r.token_ids for r in generate_agnostic(engine, c, qs, SamplingParams(), 10, policy=build_policy("kvzip"),
                                                            budget=b)] for c, qs in cases]
    batch = BatchEngine(engine, kv_memory=16 << 20, max_batch=3)
    seqs = [batch.submit(GenerationRequest(context_ids=c, question_ids=qs, max_tokens=10, policy=build_policy("kvzip"),
                                           budget=b)) for c, qs in cases]
    batch.run()
    assert [[r.token_ids for r in s.results] for s in seqs] == want


def test_prefill_first_fills_the_batch_before_it_decodes(engine):
    """prefill_first: no decode step while an admitted request still has prompt to prefill, so every
    request decodes in one full batch; each answer is still the one it gets alone."""
    rng = random.Random(21)
    specs = [("snapkv", "20%"), ("tova", "30%"), ("full", None), ("ada-snapkv", "10%"), ("h2o", "20%")]
    prompts = [_ids(rng, 40, 200) for _ in specs]
    lengths = [12, 7, 12, 9, 12]
    batch = BatchEngine(engine, kv_memory=32 << 20, max_batch=8, prefill_step=32, prefill_first=True)
    sizes = []
    step = batch.stepper.step
    batch.stepper.step = lambda reqs, tokens: (sizes.append(len(reqs)), step(reqs, tokens))[1]
    seqs = [batch.submit(_request(ids, n, b, m)) for ids, (n, b), m in zip(prompts, specs, lengths)]
    batch.run()
    assert sizes[0] == len(specs) and batch.max_running == len(specs)
    assert len(sizes) == max(lengths) - 1  # one wave: the first token comes from the prefill's logits
    for s, ids, (n, b), m in zip(seqs, prompts, specs, lengths):
        assert s.results[0].token_ids == _alone(engine, ids, n, b, m).token_ids, n
    assert batch.pool.num_used == 0 and batch.pool.reserved == 0


def test_prefill_first_in_a_tight_pool_still_decodes_one_full_batch(engine):
    """A pool that holds one full prompt at a time but several compressed ones: requests are admitted one by
    one as each compression frees memory, and prefill_first still decodes them all in one batch."""
    from kvx.runtime.memory import pool_capacity

    cfg = engine.config
    prompt, gen, n = 480, 6, 4
    block = 2 * cfg.head_dim * 4 * cfg.num_layers * cfg.num_kv_heads * 16  # one block in every segment, float32
    fits = {m: pool_capacity(cfg, prompt, parse_budget("5%"), 4, gen, m) for m in range(block, 64 * block, block)}
    memory = next(m for m, (full, compressed) in fits.items() if full == 1 and compressed >= n)
    rng = random.Random(5)
    prompts = [_ids(rng, prompt, prompt + 1) for _ in range(n)]
    batch = BatchEngine(engine, kv_memory=memory, max_batch=8, prefill_first=True)
    sizes = []
    step = batch.stepper.step
    batch.stepper.step = lambda reqs, tokens: (sizes.append(len(reqs)), step(reqs, tokens))[1]
    seqs = [batch.submit(_request(ids, "snapkv", "5%", gen)) for ids in prompts]
    batch.run()
    assert sizes == [n] * (gen - 1)
    for s, ids in zip(seqs, prompts):
        assert s.results[0].token_ids == _alone(engine, ids, "snapkv", "5%", gen).token_ids


def test_the_bench_timers_run_on_the_engine(engine):
    """kvx bench's and benchmarks/gpu_decode.py's timers: a lone request and a batch, every request decoding
    through each timed step, the pool given back."""
    from kvx.eval.bench import kvx_batch_decode_tps, kvx_decode_tps, kvx_prefill_tps

    ids = _ids(random.Random(1), 60, 61)
    assert kvx_prefill_tps(engine, ids) > 0
    assert kvx_decode_tps(engine, ids, 4) > 0
    tps, running = kvx_batch_decode_tps(engine, [ids, ids[:40], ids[:50]], 4, _policy("snapkv"), parse_budget("20%"))
    assert tps > 0 and running == 3

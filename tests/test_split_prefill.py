"""Split prefill (runtime/compression/split_prefill.py): the batched engine prefills a long prompt a piece per step,
with nothing evicted in between, so running sequences decode between the pieces and the result is the
one-shot prefill's: the same kept entries, the same greedy answer as the single-sequence engine alone."""

from __future__ import annotations

import random

import pytest
import torch

from checkpoints import make_checkpoint
from kvx.errors import KvxError
from kvx.kernels.stats import StatsRequest
from kvx.models.transformer import Transformer
from kvx.policies import build_policy, parse_budget
from kvx.runtime.engine.batch_engine import BatchEngine
from kvx.runtime.engine.model_runner import ModelRunner
from kvx.runtime.engine.sequence import GenerationRequest
from kvx.runtime.compression.split_prefill import piece_bounds, prefill_pieces, rows_read, without_short_tail
from test_batch import _alone, _ids, _request
from test_compression import one_thread  # noqa: F401  (autouse: one intra-op thread, see there)
from test_engine import StubTokenizer
from kvx.runtime.engine.batch_engine import generate_agnostic
from runtime_helpers import new_request


@pytest.mark.parametrize("n,step,tail", [(1, 4, 0), (10, 4, 0), (10, 4, 3), (10, 4, 8), (10, 5, 5), (9, 3, 20),
                                         (1000, 512, 32), (513, 512, 32), (100, 7, 1)])
def test_pieces_cover_the_prompt_in_order_and_the_last_holds_the_rows_read(n, step, tail):
    pieces = piece_bounds(n, step, tail)
    assert pieces[0][0] == 0 and pieces[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    assert all(0 < e - s <= step for s, e in pieces[:-1])
    assert pieces[-1][1] - pieces[-1][0] >= min(n, max(tail, 1))


@pytest.mark.parametrize("n,step,tail", [(1067, 512, 32), (1100, 512, 1), (1300, 512, 1), (1024, 512, 0),
                                         (700, 512, 400), (10, 4, 0), (513, 512, 1)])
def test_a_short_last_piece_joins_the_one_before(n, step, tail):
    pieces = without_short_tail(piece_bounds(n, step, tail), step)
    assert pieces[0][0] == 0 and pieces[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    sizes = [e - s for s, e in pieces]
    assert all(0 < k <= step for k in sizes[:-1])
    assert n <= step or step // 2 <= sizes[-1] < step + step // 2 + 1
    assert sizes[-1] >= min(n, max(tail, 1))
    if n == 1067:
        assert pieces == [(0, 512), (512, 1067)]


def test_rows_read_by_each_kind_of_statistic():
    assert rows_read(None) == 0
    assert rows_read(StatsRequest(window=32, window_sq=True, key_norm=True)) == 32
    assert rows_read(StatsRequest(last_row=True)) == 1
    assert rows_read(StatsRequest(window=8, sg_rows=40)) == 40
    assert rows_read(StatsRequest(value_norm=True, reconstruction=64)) == 0
    assert rows_read(StatsRequest(colsum_all=True)) is None  # H2O: every row
    assert rows_read(StatsRequest(query_moments=True)) is None  # ExpectedAttention: every row


@pytest.fixture(scope="module", params=["qwen2", "mistral"])
def engine(request, tmp_path_factory):
    # mistral: a sliding window shorter than the prompts, so each piece's window mask is exercised.
    path, _ = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param), max_position_embeddings=4096)
    return ModelRunner(Transformer.from_pretrained(path), StubTokenizer())


SPLIT = [("snapkv", "20%"), ("tova", "30%"), ("ahakv", "20%"), ("laprox", "15%"), ("ada-snapkv", "10%"),
         ("knorm", "25%"), ("streaming", "25%"), ("full", None)]


@pytest.mark.parametrize("name,budget", SPLIT, ids=[s[0] for s in SPLIT])
def test_a_split_prefill_keeps_what_the_one_shot_prefill_keeps(engine, name, budget):
    rng = random.Random(sum(map(ord, name)) + 1)
    prompts = [_ids(rng, 150, 320) for _ in range(3)]
    alone = [_alone(engine, ids, name, budget, 12) for ids in prompts]
    batch = BatchEngine(engine, kv_memory=32 << 20, max_batch=3, prefill_step=37)
    seqs = [batch.submit(_request(ids, name, budget, 12)) for ids in prompts]
    prefill_units = 0
    while batch.has_work:
        prefill_units += any(s.state == "prefill" for s in seqs)
        batch.step()
    got = [s.results[0] for s in seqs]
    assert [r.token_ids for r in got] == [r.token_ids for r in alone]
    assert [r.lengths for r in got] == [r.lengths for r in alone]  # the same entries kept per (layer, head)
    # Really split: a piece per step (a short last piece joins the one before: one piece fewer at most).
    assert prefill_units >= sum(-(-len(ids) // 37) for ids in prompts) - 2 * len(prompts)
    assert batch.pool.num_used == 0


@pytest.mark.parametrize("name", ["h2o", "expected-attention"])
def test_statistics_over_every_row_prefill_in_one_step(engine, name):
    rng = random.Random(3)
    ids = _ids(rng, 200, 201)
    req = new_request(engine, capacity=len(ids), policy=build_policy(name), budget=parse_budget("20%"))
    steps = prefill_pieces(engine, req, ids, 37)
    with pytest.raises(StopIteration) as done:
        next(steps)  # the whole prompt in the first step
    assert req.position == len(ids) and done.value.value[0].shape == (engine.config.vocab_size,)


def test_the_logits_of_a_split_prefill_equal_the_one_shot_ones(engine):
    rng = random.Random(11)
    ids = _ids(rng, 300, 301)
    one = new_request(engine, capacity=len(ids), policy=build_policy("snapkv"), budget=parse_budget("10%"))
    want = engine.prefill(one, ids)
    split = new_request(engine, capacity=len(ids), policy=build_policy("snapkv"), budget=parse_budget("10%"))
    steps, count = prefill_pieces(engine, split, ids, 64), 0
    while True:
        try:
            next(steps)
            count += 1
        except StopIteration as done:
            got = done.value[0]
            break
    assert count == 4  # 300 tokens: pieces of 64, 64, 64, 64 and the last 44
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    for a, b in zip(split.stats, one.stats):
        assert torch.allclose(a.col_sum, b.col_sum, atol=1e-5) and a.window == b.window


def test_running_sequences_decode_between_the_pieces_of_a_long_full_cache_prompt(engine):
    rng = random.Random(9)
    batch = BatchEngine(engine, kv_memory=32 << 20, max_batch=4, prefill_step=50)
    short = batch.submit(_request(_ids(rng, 20, 30), "snapkv", "50%", 40, stop_at_eos=False))
    batch.step()  # short is prefilled (one piece) and takes its first step
    long = batch.submit(_request(_ids(rng, 600, 601), "full", None, 4))
    during = []
    for _ in range(100):
        batch.step()
        if long.state == "prefill" or long.prefill_units is not None:
            during.append(len(short.out_ids))
        else:
            break
    assert len(during) >= 10 and during[-1] - during[0] >= 9  # 12 pieces, a token of short's after each
    batch.run()
    assert long.results[0].token_ids == _alone(engine, long.request.prompt_ids, "full", None, 4).token_ids


def test_kvzip_reconstructs_the_whole_context_after_a_split_prefill(tmp_path):
    from test_kvzip import ReconstructionTokenizer

    path, _ = make_checkpoint("qwen2", tmp_path, max_position_embeddings=4096)
    engine = ModelRunner(Transformer.from_pretrained(path), ReconstructionTokenizer())
    rng = random.Random(4)
    context, questions = _ids(rng, 200, 260), [_ids(rng, 3, 8) for _ in range(2)]
    b = parse_budget("20%")
    want = generate_agnostic(engine, context, questions, max_tokens=10, policy=build_policy("kvzip"), budget=b)
    batch = BatchEngine(engine, kv_memory=16 << 20, max_batch=2, prefill_step=64)
    seq = batch.submit(GenerationRequest(context_ids=context, question_ids=questions, max_tokens=10,
                                         policy=build_policy("kvzip"), budget=b))
    batch.run()
    assert [r.token_ids for r in seq.results] == [r.token_ids for r in want]
    assert [r.lengths for r in seq.results] == [r.lengths for r in want]


def test_a_bad_prefill_step_is_refused(engine):
    with pytest.raises(KvxError, match="--prefill-step"):
        BatchEngine(engine, kv_memory=8 << 20, prefill_step=0)


@pytest.mark.parametrize("name,budget", [("snapkv", "20%"), ("tova", "30%"), ("full", None)])
def test_question_agnostic_contexts_split_like_prompts(engine, name, budget):
    rng = random.Random(21)
    context, questions = _ids(rng, 200, 260), [_ids(rng, 3, 9) for _ in range(2)]
    policy, b = (None, None) if name == "full" else (build_policy(name), parse_budget(budget))
    want = generate_agnostic(engine, context, questions, max_tokens=8, policy=policy, budget=b)
    batch = BatchEngine(engine, kv_memory=16 << 20, max_batch=2, prefill_step=41)
    seq = batch.submit(GenerationRequest(context_ids=context, question_ids=questions, max_tokens=8,
                                         policy=None if name == "full" else build_policy(name), budget=b))
    batch.run()
    assert [r.token_ids for r in seq.results] == [r.token_ids for r in want]
    assert batch.pool.num_used == 0 and batch.pool.reserved == 0


def test_a_request_cancelled_between_pieces_returns_its_blocks(engine):
    rng = random.Random(5)
    batch = BatchEngine(engine, kv_memory=16 << 20, max_batch=2, prefill_step=40)
    other = batch.submit(_request(_ids(rng, 30, 40), "snapkv", "50%", 30, stop_at_eos=False))
    long = batch.submit(_request(_ids(rng, 400, 401), "snapkv", "10%", 8))
    for _ in range(4):
        batch.step()
    assert long.prefill_units is not None and batch.pool.num_used > 0  # part of the prompt is in the cache
    batch.cancel(long)
    batch.run()
    assert long.state == "cancelled" and other.state == "finished"
    assert batch.pool.num_used == 0 and batch.pool.reserved == 0


def test_with_prefill_chunk_a_full_cache_prompt_is_still_split(tmp_path):
    """--prefill-chunk evicts between the chunks of a compressed prompt; a full-cache prompt has nothing to
    evict, and is prefilled a chunk per step all the same (exactly)."""
    path, _ = make_checkpoint("qwen2", tmp_path, max_position_embeddings=4096)
    engine = ModelRunner(Transformer.from_pretrained(path), StubTokenizer(), prefill_chunk=50)
    rng = random.Random(2)
    batch = BatchEngine(engine, kv_memory=32 << 20, max_batch=2)
    short = batch.submit(_request(_ids(rng, 20, 30), "snapkv", "50%", 30, stop_at_eos=False))
    batch.step()
    long = batch.submit(_request(_ids(rng, 300, 301), "full", None, 4))
    during = []
    while long.state == "waiting" or long.prefill_units is not None or long.state == "prefill":
        batch.step()
        during.append(len(short.out_ids))
        assert len(during) < 50
    assert len(during) >= 6 and during[-1] - during[0] >= 5  # 6 chunks of 50, a token of short's after each
    batch.run()
    plain = ModelRunner(engine.model, StubTokenizer())  # the one-shot prefill
    assert long.results[0].token_ids == _alone(plain, long.request.prompt_ids, "full", None, 4).token_ids

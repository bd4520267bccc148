"""What the one-engine work fixed, each case failing on the code before it (issue 31):

- decode headroom follows whether eviction is active, not the policy's decode mode: h2o at a budget that
  keeps everything grows like a full cache, inside the pool sized for a lone request;
- a --prefill-chunk split whose last chunk is one token, or shorter than the statistics' window;
- a pool exhaustion is a bug (RuntimeError), never a user's KvxError (exit 2);
- an exception inside a step fails only the sequences it concerns and gives every block back;
- stop strings: the answer's text is exactly what was streamed, stop or not.
"""

from __future__ import annotations

import random

import pytest
import torch

from checkpoints import make_checkpoint
from kvx.errors import KvxError
from kvx.models.transformer import Transformer
from kvx.policies import build_policy, parse_budget
from kvx.runtime.engine.batch_engine import BatchEngine, generate, generate_agnostic
from kvx.runtime.engine.model_runner import ModelRunner
from kvx.runtime.cache.pool import BlockPool, PoolExhausted
from kvx.runtime.engine.sequence import FAILED, FINISHED, GenerationRequest
from test_compression import one_thread  # noqa: F401  (autouse: one intra-op thread)
from test_engine import StubTokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_checkpoint("qwen2", tmp_path_factory.mktemp("qwen2"), max_position_embeddings=4096)
    return Transformer.from_pretrained(path)


def _ids(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(3, 128) for _ in range(n)]


def test_h2o_at_a_budget_that_keeps_everything_answers_like_the_full_cache(model):
    """Several questions of 40 tokens each over a context h2o keeps whole: before, the answers were given
    DECODE_SLACK of headroom (eviction off, growth unreserved) and the lone request's pool ran out."""
    engine = ModelRunner(model, StubTokenizer())
    ctx, questions = _ids(150), [_ids(9, 1), _ids(7, 2)]
    h2o = generate_agnostic(engine, ctx, questions, max_tokens=40, policy=build_policy("h2o"),
                            budget=parse_budget("100%"))
    full = generate_agnostic(engine, ctx, questions, max_tokens=40)
    assert [r.token_ids for r in h2o] == [r.token_ids for r in full]
    assert all(len(r.token_ids) == 40 for r in h2o)
    aware = generate(engine, ctx, max_tokens=40, policy=build_policy("h2o"), budget=parse_budget("100%"))
    assert aware.token_ids == generate(engine, ctx, max_tokens=40).token_ids


@pytest.mark.parametrize("n", [129, 150])
def test_a_short_last_prefill_chunk_still_scores_from_the_window(model, n):
    """129 tokens in chunks of 64 left a last chunk of one token (it took the decode path and recorded no
    statistics: a crash); 150 left 22 rows, fewer than SnapKV's 32-row window. The last chunk now holds
    the window, and the recent window is kept."""
    engine = ModelRunner(model, StubTokenizer(), build_policy("snapkv"), parse_budget("20%"), prefill_chunk=64)
    ids = _ids(n, 3)
    seq_results = generate(engine, ids, max_tokens=4)
    assert seq_results.generated_tokens == 4
    per_head = parse_budget("20%").per_head(n)
    assert seq_results.lengths == [[per_head] * model.config.num_kv_heads] * model.config.num_layers


def test_pool_exhaustion_is_a_bug_not_a_user_error():
    assert issubclass(PoolExhausted, RuntimeError) and not issubclass(PoolExhausted, KvxError)
    pool = BlockPool(2, 4, 8, torch.float32, "cpu")
    with pytest.raises(PoolExhausted):
        pool.allocate(3)


def test_a_failing_step_releases_every_block_and_the_engine_goes_on(model, monkeypatch):
    engine = ModelRunner(model, StubTokenizer())
    batch = BatchEngine(engine, kv_memory=8 << 20, max_batch=4)
    seqs = [batch.submit(GenerationRequest(prompt_ids=_ids(40, i), max_tokens=30, stop_at_eos=False,
                                           policy=build_policy(p), budget=parse_budget("50%") if p != "full" else None))
            for i, p in enumerate(["snapkv", "h2o", "full"])]
    for _ in range(8):  # all admitted, prefilled and decoding
        batch.step()
    assert all(s.state == "decode" for s in seqs) and batch.pool.num_used > 0

    def broken(*args, **kwargs):
        raise ValueError("injected")

    monkeypatch.setattr(batch.stepper, "step", broken)
    batch.step()
    assert all(s.state == FAILED and s.internal and "injected" in s.error for s in seqs)
    assert batch.pool.num_used == 0 and batch.pool.reserved == 0 and not batch.has_work
    assert batch.internal_errors == 1
    monkeypatch.undo()
    again = batch.submit(GenerationRequest(prompt_ids=_ids(40, 0), max_tokens=5))
    batch.run()
    assert again.state == FINISHED and len(again.results[0].token_ids) == 5
    assert batch.pool.num_used == 0 and batch.pool.reserved == 0


def test_a_failing_prefill_fails_only_its_own_request(model, monkeypatch):
    engine = ModelRunner(model, StubTokenizer())
    batch = BatchEngine(engine, kv_memory=8 << 20, max_batch=4)
    ok = batch.submit(GenerationRequest(prompt_ids=_ids(30, 1), max_tokens=6))
    batch.step()  # ok is prefilled and decoding
    bad = batch.submit(GenerationRequest(prompt_ids=_ids(30, 2), max_tokens=6))
    real = engine.prefill

    def prefill(req, ids, *args, **kwargs):
        if ids == bad.request.prompt_ids:
            raise IndexError("injected")
        return real(req, ids, *args, **kwargs)

    monkeypatch.setattr(engine, "prefill", prefill)
    batch.run()
    assert bad.state == FAILED and bad.internal and ok.state == FINISHED
    assert batch.pool.num_used == 0 and batch.pool.reserved == 0


@pytest.mark.parametrize("with_stop", [True, False])
def test_the_answer_is_what_was_streamed(model, with_stop):
    engine = ModelRunner(model, StubTokenizer())
    ids = _ids(50, 4)
    full = generate(engine, ids, max_tokens=12, stop_at_eos=False)
    stop = (f"{full.token_ids[5]} {full.token_ids[6]}",) if with_stop else ()
    pieces = []
    batch = BatchEngine(engine, kv_memory=8 << 20)
    seq = batch.submit(GenerationRequest(prompt_ids=ids, max_tokens=12, stop=stop, stop_at_eos=False,
                                         on_text=lambda s, q, t: pieces.append(t)))
    batch.run()
    r = seq.results[0]
    assert r.text == "".join(pieces)
    assert r.finish_reason == ("stop" if with_stop else "length")

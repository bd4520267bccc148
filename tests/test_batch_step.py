"""The batched decode step's static buffers (what a CUDA graph replays): padded to batch buckets, with block
tables rewritten only where they changed, the step gives what the exact, unpadded step gives.

On the CPU nothing is captured; padding is forced on here (`pad=True`) so that the buffers a GPU graph
reads - the scratch block for empty slots, slots vacated as sequences finish, tables refreshed after
decode-time eviction - are exercised on every run of the suite. tests/test_gpu_engine.py replays the
same step as CUDA graphs against eager decode.
"""

from __future__ import annotations

import random

import pytest
import torch

from checkpoints import make_checkpoint
from kvx.models.transformer import Transformer
from kvx.runtime.engine.batch_engine import BatchEngine
from kvx.runtime.engine.batch_step import BatchStepper, StaticStep, batch_bucket, width_bucket
from kvx.runtime.engine.model_runner import ModelRunner
from test_batch import _ids, _request
from test_compression import one_thread  # noqa: F401  (autouse: one intra-op thread, see there)
from test_engine import StubTokenizer

# Every decode-time path the buffers feed: mass added (h2o) and replaced (tova), recent queries (ahakv),
# positional eviction (streaming), compressed once (snapkv, ada-snapkv), full.
MIX = [("h2o", "20%"), ("tova", "30%"), ("ahakv", "25%"), ("streaming", "25%"), ("snapkv", "10%"),
       ("ada-snapkv", "15%"), ("full", None)]


@pytest.fixture(scope="module", params=["qwen2", "mistral"])
def engine(request, tmp_path_factory):
    path, _ = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param), max_position_embeddings=4096)
    return ModelRunner(Transformer.from_pretrained(path), StubTokenizer())


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 33, 512, 513)] == [1, 2, 4, 8, 8, 16, 64, 512, 1024]
    assert [width_bucket(n) for n in (0, 1, 2, 3, 17, 64)] == [1, 1, 2, 4, 32, 64]


def _run(engine, prompts, lengths, pad: bool):
    batch = BatchEngine(engine, kv_memory=32 << 20, max_batch=8)
    batch.stepper = BatchStepper(engine, batch.pool, use_graphs=False, pad=pad)
    seqs = [batch.submit(_request(ids, n, b, m)) for ids, (n, b), m in zip(prompts, MIX, lengths)]
    sizes = []
    while batch.has_work:
        batch.step()
        sizes.append(len(batch.scheduler.running))
    assert batch.pool.num_used == 0 and batch.pool.reserved == 0
    return [s.results[0].token_ids for s in seqs], batch


def test_padded_buckets_equal_the_exact_step(engine):
    rng = random.Random(11)
    prompts = [_ids(rng, 40, 260) for _ in MIX]
    # Different answer lengths: the batch shrinks 7 -> 1, so it moves down the buckets (8, 4, 2, 1) and
    # the slots of finished sequences go back to the scratch block.
    lengths = [30, 6, 22, 11, 3, 17, 26]
    exact, _ = _run(engine, prompts, lengths, pad=False)
    padded, batch = _run(engine, prompts, lengths, pad=True)
    assert padded == exact
    assert all(len(t) == m for t, m in zip(padded, lengths))
    assert {key[0] for key in batch.stepper._entries} >= {8, 4, 2, 1}


def test_incremental_tables_equal_a_fresh_load(engine):
    """After steps with decode-time eviction (tables shrink and grow), the buffers a stepper refreshed
    incrementally hold what a fresh set of buffers loaded from scratch holds."""
    rng = random.Random(5)
    prompts = [_ids(rng, 60, 200) for _ in MIX[:4]]
    batch = BatchEngine(engine, kv_memory=32 << 20, max_batch=8)
    batch.stepper = BatchStepper(engine, batch.pool, use_graphs=False, pad=True)
    seqs = [batch.submit(_request(ids, n, b, 40)) for ids, (n, b) in zip(prompts, MIX[:4])]
    checked = 0
    for _ in range(60):
        if not batch.has_work:
            break
        batch.step()
        running = [s.req for s in seqs if s.state == "decode"]
        if not running or not batch.stepper._entries:
            continue
        key, entry = next(reversed(batch.stepper._entries.items()))
        if key[0] != batch_bucket(len(running)):
            continue
        tokens = [1] * len(running)
        with torch.inference_mode():  # as in the engine's step
            fresh = StaticStep(engine, batch.pool, *key)
            entry.load(running, tokens)
            fresh.load(running, tokens)
        for name in ("tables", "lengths", "ids", "pos"):
            assert torch.equal(getattr(entry, name), getattr(fresh, name)), name
        checked += 1
    assert checked >= 10


def test_the_scratch_block_is_never_handed_out(engine):
    rng = random.Random(2)
    prompts = [_ids(rng, 40, 200) for _ in MIX[:3]]
    _, batch = _run(engine, prompts, [12, 5, 9], pad=True)
    pool = batch.pool
    assert pool.scratch == pool.num_blocks and pool.k.shape[0] == pool.num_blocks + 1
    assert pool.scratch not in pool._free
    taken = pool.allocate(pool.num_free)
    assert pool.scratch not in taken
    pool.free(taken)

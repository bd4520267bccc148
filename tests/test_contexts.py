"""Stored compressed contexts: the file round trip is exact, answers from a loaded file equal answers from
the context compressed in the same run, requests on one context share its blocks in the pool, and a bad
file is a KvxError. CPU, float32, greedy, tiny random checkpoints."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint
from test_compression import one_thread  # noqa: F401  (autouse: one intra-op thread)
from test_kvzip import ReconstructionTokenizer

from kvx.errors import KvxError
from kvx.models.fingerprint import model_fingerprint
from kvx.models.transformer import Transformer
from kvx.policies import build_policy, parse_budget
from kvx.runtime.contexts.context_file import load_context, save_context
from kvx.runtime.contexts.resident import ResidentContext
from kvx.runtime.contexts.run import answer_from_context, compress_context
from kvx.runtime.contexts.stored import ContextInfo
from kvx.runtime.engine.batch_engine import BatchEngine, generate_agnostic
from kvx.runtime.engine.model_runner import ModelRunner
from kvx.runtime.engine.sequence import FINISHED, GenerationRequest

# kvzip (reconstruction), window-scored (snapkv), head-adaptive (ada-snapkv), model-wide (laprox), and the
# decode-time families whose state travels in the file: accumulated mass (h2o), recent queries (ahakv).
POLICIES = [("kvzip", "20%"), ("snapkv", "20%"), ("ada-snapkv", "15%"), ("laprox", "15%"), ("h2o", "25%"),
            ("ahakv", "20%")]


@pytest.fixture(scope="module", params=["qwen2", "mistral"])
def model(request, tmp_path_factory):
    path, _ = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param), max_position_embeddings=4096)
    m = Transformer.from_pretrained(path)
    m.fingerprint = model_fingerprint(path)
    return m


def _engine(model):
    return ModelRunner(model, ReconstructionTokenizer())


def _info(model, name, budget, n) -> ContextInfo:
    b = parse_budget(budget)
    return ContextInfo(model_fingerprint=model.fingerprint, tokenizer_fingerprint="stub", dtype="float32", weights="float32",
                       policy={"name": name, "allocation": None, "args": {}},
                       budget={"fraction": b.fraction} if b.fraction is not None else {"tokens": b.tokens},
                       wrapping={"raw": True, "system": None}, context_tokens=n)


def _ids(rng, n):
    return [rng.randrange(3, 128) for _ in range(n)]


def _load(model, path):
    return load_context(path, model.config, model.fingerprint, "stub", torch.float32, weights="float32")


def _compressed(model, name, budget, seed=0, n=300):
    if name == "kvzip" and model.config.sliding_window_for(0) is not None:
        pytest.skip("kvzip does not support sliding-window models")
    rng = random.Random(seed)
    ctx = _ids(rng, n)
    eng = _engine(model)
    stored, _ = compress_context(eng, ctx, _info(model, name, budget, n), build_policy(name), parse_budget(budget))
    return eng, ctx, stored


@pytest.mark.parametrize("name,budget", POLICIES, ids=[p[0] for p in POLICIES])
def test_file_round_trip_is_bit_exact(model, tmp_path, name, budget):
    _, _, stored = _compressed(model, name, budget)
    path = tmp_path / "c.kvc"
    size = save_context(stored, path)
    assert size == path.stat().st_size
    back = _load(model, path)
    assert back.position == stored.position and np.array_equal(back.lengths, stored.lengths)
    for a, b in [(stored.keys, back.keys), (stored.values, back.values), (stored.positions, back.positions)]:
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and torch.equal(x, y)
    assert (stored.mass is None) == (back.mass is None)
    if stored.mass is not None:
        assert all(torch.equal(x, y) for x, y in zip(stored.mass, back.mass))
    assert back.head_budget == stored.head_budget
    assert (stored.recent_q is None) == (back.recent_q is None)
    if stored.recent_q is not None:
        assert torch.equal(stored.recent_q, back.recent_q)
    # Only the kept entries: the file is about the compressed bytes, not a full cache's.
    cfg = model.config
    full = cfg.num_layers * cfg.num_kv_heads * stored.position * 2 * cfg.head_dim * 4
    assert stored.entries < 0.4 * cfg.num_layers * cfg.num_kv_heads * stored.position
    assert size < 0.5 * full


@pytest.mark.parametrize("name,budget", POLICIES, ids=[p[0] for p in POLICIES])
def test_answers_from_a_loaded_file_equal_the_in_memory_context(model, tmp_path, name, budget):
    eng, ctx, stored = _compressed(model, name, budget, seed=1)
    rng = random.Random(2)
    questions = [_ids(rng, 7), _ids(rng, 12), _ids(rng, 1)]
    want = generate_agnostic(eng, ctx, questions, max_tokens=12, policy=build_policy(name), budget=parse_budget(budget))
    save_context(stored, tmp_path / "c.kvc")
    got = answer_from_context(eng, _load(model, tmp_path / "c.kvc"), questions, max_tokens=12)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.kv_entries_kept for r in got] == [r.kv_entries_kept for r in want]


@pytest.mark.parametrize("name,budget", [("snapkv", "20%"), ("h2o", "25%")], ids=["shared", "private-copy"])
def test_requests_on_one_context_share_its_blocks(model, name, budget):
    """Eight requests on one resident context answer as they do one by one; the context's blocks are held
    once (snapkv; h2o evicts while decoding, so each of its requests answers from a private copy); when all
    are done and the context is dropped, every block is back."""
    eng, _, stored = _compressed(model, name, budget, seed=3, n=1200)
    rng = random.Random(4)
    questions = [_ids(rng, rng.randrange(2, 20)) for _ in range(8)]
    alone = [answer_from_context(eng, stored, [q], max_tokens=10)[0].token_ids for q in questions]

    batch = BatchEngine(eng, kv_memory=8 << 20, max_batch=8)
    ctx = ResidentContext(stored)
    seqs = [batch.submit(GenerationRequest(context=ctx, question_ids=[q], max_tokens=10)) for q in questions]
    pool = batch.pool
    B = pool.block_size
    ctx_blocks = ctx.blocks(B)
    peak_users = 0
    while batch.has_work:
        batch.step()
        running = [s for s in batch.scheduler.running if s.req is not None]
        if running:
            peak_users = max(peak_users, ctx.users)
            own = sum(s.req.cache.blocks_held() + (s.snapshot.cache.blocks_held() if s.snapshot.cache is not s.req.cache else 0)
                      for s in running)
            # Held once: the pool holds the context's blocks plus what each request holds of its own.
            assert pool.num_used == ctx_blocks + own
            if not ctx.decode_time:
                assert all(s.req.cache.blocks_held() < ctx_blocks for s in running)
    assert peak_users == 8
    assert all(s.state == FINISHED for s in seqs)
    assert [s.results[0].token_ids for s in seqs] == alone
    assert pool.num_used == ctx_blocks and ctx.users == 0 and ctx.resident
    batch.scheduler.contexts.drop(ctx)
    assert pool.num_used == 0 and pool.reserved == 0


def test_an_unused_context_gives_its_blocks_back_to_admission(model):
    eng, _, stored = _compressed(model, "snapkv", "20%", seed=5)
    ctx = ResidentContext(stored)
    per_block = 2 * 32 * model.config.head_dim * 4
    blocks = ctx.blocks(32)
    batch = BatchEngine(eng, kv_memory=(blocks + 60) * per_block, max_batch=4)
    first = batch.submit(GenerationRequest(context=ctx, question_ids=[[5, 6, 7]], max_tokens=4))
    batch.run()
    assert first.state == FINISHED and ctx.resident
    # A prompt that needs more than what is left besides the idle context (4 segments of 16 blocks, 60
    # free) fits only once the context is unloaded.
    rng = random.Random(6)
    big = batch.submit(GenerationRequest(prompt_ids=_ids(rng, 500), max_tokens=4))
    batch.run()
    assert big.state == FINISHED and not ctx.resident
    # And loaded again, from its host copy, on the next use.
    again = batch.submit(GenerationRequest(context=ctx, question_ids=[[5, 6, 7]], max_tokens=4))
    batch.run()
    assert again.results[0].token_ids == first.results[0].token_ids and ctx.loads == 2


# -- bad files ------------------------------------------------------------------------------------------

def _tamper(path, out, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, meta)
    save_file(tensors, str(out), metadata=meta)
    return out


def _set(name, fn):
    def edit(t, meta):
        t[name] = fn(t[name])
    return edit


BAD = {
    "lengths-too-long": (_set("lengths", lambda x: x + 1000), "length"),
    "lengths-shape": (_set("lengths", lambda x: x[:, :1].contiguous()), "lengths must be"),
    "keys-shape": (_set("k.0", lambda x: x[:-1].contiguous()), "k.0 must be"),
    "keys-dtype": (_set("v.1", lambda x: x.double()), "v.1 must be"),
    "position-beyond": (_set("pos.0", lambda x: x + 100000), "positions outside"),
    "position-order": (_set("pos.1", lambda x: x.flip(0).contiguous()), "out of order"),
    "extra-tensor": (lambda t, m: t.update({"k.99": torch.zeros(1, 4)}), "unexpected tensors"),
    "model": (lambda t, m: m.update(info=m["info"].replace(m["info"][m["info"].index('"model_fingerprint": "') + 22:][:8], "deadbeef")), "another model"),
    "dtype": (lambda t, m: m.update(info=m["info"].replace('"dtype": "float32"', '"dtype": "bfloat16"')), "bfloat16"),
    "version": (lambda t, m: m.update(version="9"), "newer kvx"),
    "weights": (lambda t, m: m.update(info=m["info"].replace('"weights": "float32"', '"weights": "int8"')), "int8 weights"),
    "format": (lambda t, m: m.update(format="other"), "not a kvx context file"),
    "policy": (lambda t, m: m.update(info=m["info"].replace('"name": "snapkv"', '"name": "nosuch"')), "unknown policy"),
    "context-position": (lambda t, m: m.update(position="999999"), "position"),
}


@pytest.fixture(scope="module")
def good_file(model, tmp_path_factory):
    _, _, stored = _compressed(model, "snapkv", "20%", seed=7)
    path = tmp_path_factory.mktemp("good") / "c.kvc"
    save_context(stored, path)
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_file_is_one_clear_error(model, good_file, tmp_path, case):
    edit, fragment = BAD[case]
    bad = _tamper(good_file, tmp_path / "bad.kvc", edit)
    with pytest.raises(KvxError, match=fragment):
        _load(model, bad)


@pytest.mark.parametrize("cut", [4, 100, 0.5, -7])
def test_a_truncated_file_is_one_clear_error(model, good_file, tmp_path, cut):
    data = good_file.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (cut if cut > 0 else len(data) + cut)
    bad = tmp_path / "short.kvc"
    bad.write_bytes(data[:n])
    with pytest.raises(KvxError):
        _load(model, bad)


def test_one_resident_context_answers_in_successive_lone_runs(model):
    """run_alone gives each run a pool of its own: a context left resident in an earlier run's pool is
    moved, not read from a pool that is gone."""
    eng, _, stored = _compressed(model, "snapkv", "20%", seed=8)
    ctx = ResidentContext(stored)
    first = answer_from_context(eng, ctx, [[5, 6, 7]], max_tokens=6)[0].token_ids
    assert ctx.resident
    again = answer_from_context(eng, ctx, [[5, 6, 7]], max_tokens=6)[0].token_ids
    assert again == first and ctx.loads == 2

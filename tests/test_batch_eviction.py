"""Ranked decode-time eviction (runtime/compression/batch_eviction.py) against the per-segment path it replaces
(runtime/compression/decode_eviction.py's evict_per_segment, each policy's decode_keep segment by segment): on random
caches, masses (with ties), budgets and policy options, several requests of different policies evicted
in one pass leave every (layer, kv head) with the same entries, positions, mass and blocks."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvx.policies import build_policy, parse_budget
from kvx.runtime.compression import batch_eviction
from kvx.runtime.compression.batch_eviction import evict_batch, evict_due
from kvx.runtime.compression.decode_eviction import DECODE_SLACK, evict_per_segment
from kvx.runtime.cache.paged_cache import PagedKVCache
from kvx.runtime.cache.pool import BlockPool
from kvx.runtime.engine.state import SequenceState

L, HKV, G, D = 3, 4, 2, 8
POLICIES = [("tova", {}), ("tova", {"sinks": "2", "window": "5"}), ("h2o", {}), ("h2o", {"recent": "3", "sinks": "1"}),
            ("h2o", {"recent": "40"}), ("streaming", {}), ("streaming", {"sinks": "0"}), ("streaming", {"sinks": "30"}),
            ("ahakv", {"window": "6"}), ("ahakv", {"sinks": "2", "window": "4", "kernel": "4"}),
            ("ahakv", {"window": "3", "prior_pad": "include", "decode_scale": "position", "kernel": "1"}),
            ("ahakv", {"window": "50"})]
ENGINE = SimpleNamespace(group=G, device=torch.device("cpu"), config=SimpleNamespace(head_dim=D), scale=D ** -0.5)


def _request(pool, rng, gen, name, args) -> SequenceState:
    policy = build_policy(name, args=args)
    cache = PagedKVCache(pool, L, HKV, track_mass=policy.decode_mode in ("accumulate", "last"))
    budget = [[rng.randint(0, 24) for _ in range(HKV)] for _ in range(L)]
    for layer in range(L):
        lc = cache.layers[layer]
        lengths = []
        for g in range(HKV):
            # Mostly due (over budget + slack), some under their budget, some empty.
            n = rng.choice([0, budget[layer][g], budget[layer][g] + DECODE_SLACK + rng.randint(0, 30)])
            lc.resize(g, n + rng.randint(0, 20))
            lengths.append(n)
        lc.lengths = lengths
        for g, n in enumerate(lengths):
            s = lc.slots(g)
            pool.k_flat[s] = torch.randn(n, D, generator=gen)
            pool.v_flat[s] = torch.randn(n, D, generator=gen)
            pool.pos_flat[s] = torch.sort(torch.randperm(500, generator=gen)[:n]).values
            # Few distinct values: ties everywhere, so the tie rule (lower index first) is exercised.
            lc.set_head_mass(g, torch.randint(0, 4, (n,), generator=gen).float() / 4)
    recent_q = [None] * L
    if policy.decode_mode == "recent_queries":  # the last r queries of every head, r = the window (or fewer)
        r = min(policy.window, rng.choice([policy.window, 2]))
        recent_q = [torch.randn(HKV * G, r, D, generator=gen) for _ in range(L)]
        if rng.random() < 0.5:
            recent_q = torch.stack(recent_q)  # as the batched step keeps them
    return SequenceState(cache=cache, policy=policy, budget=parse_budget("10%"), position=500, head_budget=budget,
                   recent_q=recent_q)


def _twin(req: SequenceState) -> SequenceState:
    return SequenceState(cache=req.cache.clone(), policy=req.policy, budget=req.budget, position=req.position,
                   head_budget=[list(h) for h in req.head_budget], recent_q=req.recent_q)


def _state(req: SequenceState) -> list:
    out = []
    for lc in req.cache.layers:
        for g in range(HKV):
            k, v, pos = lc.head(g)
            out.append((lc.lengths[g], len(lc.tables[g]), k, v, pos, lc.head_mass(g)))
    return out


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("small_passes", [False, True])
def test_batched_eviction_equals_the_per_request_path(block_size, seed, small_passes, monkeypatch):
    if small_passes:  # a few rows per pass: requests (and their layers' heads) split across passes
        monkeypatch.setattr(batch_eviction, "_PASS_ELEMENTS", {"cpu": 300 * D})
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    pool = BlockPool(65536 // block_size, block_size, D, torch.float32, "cpu")
    batch = [_request(pool, rng, gen, *POLICIES[i % len(POLICIES)]) for i in range(rng.randint(6, 12))]
    alone = [_twin(r) for r in batch]
    assert evict_batch(ENGINE, batch) == []
    for r in alone:
        evict_per_segment(ENGINE, r)
    evicted = 0
    for got, want in zip(batch, alone):
        for (n, blocks, k, v, pos, mass), (wn, wblocks, wk, wv, wpos, wmass) in zip(_state(got), _state(want)):
            assert (n, blocks) == (wn, wblocks)
            assert torch.equal(pos, wpos) and torch.equal(k, wk) and torch.equal(v, wv)
            assert torch.equal(mass, wmass)
        for lc in got.cache.layers:  # nothing past a length carries mass (the next eviction would read it)
            for g in range(HKV):
                tail = torch.arange(lc.lengths[g], lc.capacities[g])
                assert not lc.pool.mass_flat[lc.slots(g, tail)].any()
        assert np.array_equal(got.cache.length_array, np.array(want.cache.lengths()))
        assert (got.cache.length_array <= np.array(got.head_budget) + DECODE_SLACK - 1).all()
        evicted += got.cache.compacted
    assert evicted > 0
    for r in batch + alone:
        r.cache.release()
    assert pool.num_used == 0


def test_evict_due_sends_a_policy_without_a_rule_per_segment():
    """The engine's entry point: requests with a batched rule in one pass, the others per segment."""
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(3)
    pool = BlockPool(2048, 4, D, torch.float32, "cpu")
    req, ruled = _request(pool, rng, gen, "tova", {}), _request(pool, rng, gen, "h2o", {})
    req.policy.decode_rule = lambda n, keep: None
    before, ruled_before = req.cache.lengths(), ruled.cache.lengths()
    alone = _twin(req)
    evict_per_segment(ENGINE, alone)
    evict_due(ENGINE, [req, ruled])
    assert req.cache.lengths() != before and req.cache.lengths() == alone.cache.lengths()
    assert ruled.cache.lengths() != ruled_before


def test_a_policy_without_a_rule_is_handed_back():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    pool = BlockPool(2048, 4, D, torch.float32, "cpu")
    tova, other = _request(pool, rng, gen, "tova", {}), _request(pool, rng, gen, "h2o", {})
    other.policy.decode_rule = lambda n, keep: None  # a scorer with decode_keep() only
    before = other.cache.lengths()
    assert evict_batch(ENGINE, [other, tova]) == [other]
    assert other.cache.lengths() == before and tova.cache.compacted


def test_nothing_due_changes_nothing():
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(1)
    pool = BlockPool(2048, 4, D, torch.float32, "cpu")
    req = _request(pool, rng, gen, "h2o", {})
    req.head_budget = [[10_000] * HKV for _ in range(L)]
    before, blocks = req.cache.lengths(), pool.num_used
    assert evict_batch(ENGINE, [req]) == []
    assert req.cache.lengths() == before and pool.num_used == blocks and not req.cache.compacted


@pytest.mark.parametrize("args", [{}, {"sinks": "3", "window": "5", "kernel": "4"},
                                  {"prior_pad": "include", "decode_scale": "position"}, {"kernel": "1", "window": "2"}])
def test_ahakv_batched_scores_equal_its_per_segment_score(args):
    """AhaKV's decode_scores over padded rows against decode_score segment by segment (float32, 1e-5)."""
    from kvx.policies.base import DecodeBatch, DecodeView

    scorer = build_policy("ahakv", args=args).scorer
    gen = torch.Generator().manual_seed(7)
    rows, r, qpos = 9, 4, 300
    lengths = [0, 1, 5, 17, 40, 40, 63, 8, 2]
    longest = max(lengths)
    keys, values = torch.randn(rows, longest, D, generator=gen), torch.randn(rows, longest, D, generator=gen)
    positions = torch.stack([torch.sort(torch.randperm(qpos + 1, generator=gen)[:longest]).values for _ in range(rows)])
    queries = torch.randn(rows, G, r, D, generator=gen)
    keep = torch.tensor([[max(1, n // 3)] for n in lengths])
    valid = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    batch = DecodeBatch(valid=valid, positions=positions, mass=torch.zeros(rows, longest), keep=keep,
                        query_position=torch.full((rows, 1), qpos), recent_queries=queries, head_dim=D,
                        scale=D ** -0.5, load_kv=lambda: (keys, values))
    got = scorer.decode_scores(batch)
    for x, n in enumerate(lengths):
        view = DecodeView(positions=positions[x, :n], key_mass=torch.zeros(n), recent_queries=queries[x],
                          query_position=qpos, head_dim=D, scale=D ** -0.5, keys=keys[x, :n], values=values[x, :n])
        want = scorer.decode_score(view, int(keep[x]))
        assert torch.allclose(got[x, :n], want, rtol=1e-5, atol=1e-7), (x, got[x, :n], want)

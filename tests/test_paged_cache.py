"""PagedKVCache against RaggedKVCache, its contiguous twin: the same random appends, reserves, compactions
and decode-time evictions leave the same entries, positions and mass in every (layer, kv head), and the
paged cache's memoised block-table tensors, slots and block range stay those of its tables."""

from __future__ import annotations

import random

import pytest
import torch

from kvx.runtime.cache import RaggedKVCache
from kvx.runtime.paged_cache import PagedKVCache
from kvx.runtime.pool import BlockPool

L, HKV, D = 3, 2, 8


def _slots_from_scratch(lc, g: int) -> torch.Tensor:
    B = lc.pool.block_size
    table = torch.tensor(lc.tables[g], dtype=torch.long)
    idx = torch.arange(lc.lengths[g])
    return table[idx // B] * B + idx % B if idx.numel() else idx


def _check_equal(paged: PagedKVCache, ragged: RaggedKVCache) -> None:
    assert paged.lengths() == ragged.lengths()
    for p_lc, r_lc in zip(paged.layers, ragged.layers):
        for g in range(HKV):
            assert torch.equal(p_lc.slots(g), _slots_from_scratch(p_lc, g))
            (pk, pv, pp), (rk, rv, rp) = p_lc.head(g), r_lc.head(g)
            assert torch.equal(pk, rk) and torch.equal(pv, rv) and torch.equal(pp, rp)
            assert torch.equal(p_lc.head_positions(g), rp)
            assert torch.equal(r_lc.head_positions(g), rp)
            assert torch.allclose(p_lc.head_mass(g), r_lc.head_mass(g))
            assert p_lc.capacities[g] >= p_lc.lengths[g]
        sizes = [len(t) for t in p_lc.tables]
        assert p_lc.block_range() == (min(sizes), max(sizes))  # from the capacity array, always the tables' own


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_cache_equals_ragged_cache_under_random_operations(seed, block_size):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    pool = BlockPool(4096 // block_size + 64, block_size, D, torch.float32, "cpu")
    paged = PagedKVCache(pool, L, HKV, capacity=4, track_mass=True)
    ragged = RaggedKVCache(L, HKV, D, torch.float32, "cpu", 4, track_mass=True)
    position = 0
    for _ in range(40):
        op = rng.choice(["append", "append", "reserve", "compact", "compact_layer", "mass"])
        if op == "append":
            T = rng.randint(1, 9)
            paged.reserve(T)
            ragged.reserve(T)
            pos = torch.arange(position, position + T)
            for layer in range(L):
                k, v = torch.randn(HKV, T, D, generator=gen), torch.randn(HKV, T, D, generator=gen)
                paged.append(layer, k, v, pos)
                ragged.append(layer, k, v, pos)
            position += T
        elif op == "reserve":
            extra, headroom = rng.randint(0, 20), rng.randint(0, 20)
            paged.reserve(extra, headroom)
            ragged.reserve(extra, headroom)
        elif op == "mass":
            layer, g = rng.randrange(L), rng.randrange(HKV)
            n = paged.layers[layer].lengths[g]
            values = torch.rand(n, generator=gen)
            paged.layers[layer].set_head_mass(g, values)
            ragged.layers[layer].set_head_mass(g, values)
        else:
            layers = range(L) if op == "compact" else [rng.randrange(L)]
            headroom = rng.randint(0, 12)
            keep_all = []
            for layer in layers:
                keep = []
                for g in range(HKV):
                    n = paged.layers[layer].lengths[g]
                    count = rng.randint(0, n)
                    keep.append(torch.sort(torch.randperm(n, generator=gen)[:count]).values)
                keep_all.append(keep)
                if op == "compact_layer":
                    paged.compact_layer(layer, keep, headroom)
                    ragged.compact_layer(layer, keep, headroom)
            if op == "compact":
                paged.compact(keep_all, headroom)
                ragged.compact(keep_all, headroom)
        _check_equal(paged, ragged)
    held = paged.blocks_held()
    assert pool.num_used == held and paged.peak_bytes >= paged.bytes_allocated()
    paged.release()
    assert pool.num_used == 0 and paged.lengths() == [[0] * HKV for _ in range(L)]
    assert all(lc.slots(g).numel() == 0 for lc in paged.layers for g in range(HKV))


def test_the_peak_follows_every_growth_and_not_a_shrink():
    pool = BlockPool(256, 4, D, torch.float32, "cpu")
    cache = PagedKVCache(pool, L, HKV)
    cache.reserve(10)
    grown = cache.bytes_allocated()
    assert cache.peak_bytes == grown > 0
    cache.compact([[torch.arange(2) for _ in range(HKV)] for _ in range(L)], headroom=0)
    assert cache.bytes_allocated() < grown and cache.peak_bytes == grown
    cache.compact_layer(0, [torch.arange(2) for _ in range(HKV)], headroom=40)  # grows one layer past the peak
    assert cache.bytes_allocated() > grown and cache.peak_bytes == cache.bytes_allocated()

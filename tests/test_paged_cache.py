"""PagedKVCache against a plain reference (per (layer, kv head), tensors of the entries held): the same
random appends, reserves, compactions and decode-time evictions leave the same entries, positions and mass
in every segment, and the paged cache's memoised block-table tensors, slots and block range stay those of
its tables."""

from __future__ import annotations

import random

import pytest
import torch

from kvx.runtime.cache.paged_cache import PagedKVCache
from kvx.runtime.cache.pool import BlockPool

L, HKV, D = 3, 2, 8


class _Segment:
    def __init__(self):
        self.k, self.v = torch.zeros(0, D), torch.zeros(0, D)
        self.pos, self.mass = torch.zeros(0, dtype=torch.long), torch.zeros(0)


class ReferenceCache:
    """What a cache must hold, in the plainest form: per (layer, kv head) the entries' K, V, positions and
    mass as tensors; appends concatenate, compactions index, mass is set by prefix."""

    def __init__(self):
        self.segs = [[_Segment() for _ in range(HKV)] for _ in range(L)]

    def lengths(self):
        return [[s.k.shape[0] for s in layer] for layer in self.segs]

    def append(self, layer, k, v, pos):
        for g, s in enumerate(self.segs[layer]):
            s.k, s.v = torch.cat([s.k, k[g]]), torch.cat([s.v, v[g]])
            s.pos, s.mass = torch.cat([s.pos, pos]), torch.cat([s.mass, torch.zeros(len(pos))])

    def set_head_mass(self, layer, g, values):
        s = self.segs[layer][g]
        s.mass = torch.cat([values.float(), s.mass[values.numel():]])

    def compact_layer(self, layer, keep):
        for g, idx in enumerate(keep):
            s = self.segs[layer][g]
            s.k, s.v, s.pos, s.mass = s.k[idx], s.v[idx], s.pos[idx], s.mass[idx]


def _slots_from_scratch(lc, g: int) -> torch.Tensor:
    B = lc.pool.block_size
    table = torch.tensor(lc.tables[g], dtype=torch.long)
    idx = torch.arange(lc.lengths[g])
    return table[idx // B] * B + idx % B if idx.numel() else idx


def _check_equal(paged: PagedKVCache, ref: ReferenceCache) -> None:
    assert paged.lengths() == ref.lengths()
    for p_lc, r_layer in zip(paged.layers, ref.segs):
        for g in range(HKV):
            assert torch.equal(p_lc.slots(g), _slots_from_scratch(p_lc, g))
            (pk, pv, pp), r = p_lc.head(g), r_layer[g]
            assert torch.equal(pk, r.k) and torch.equal(pv, r.v) and torch.equal(pp, r.pos)
            assert torch.equal(p_lc.head_positions(g), r.pos)
            assert torch.allclose(p_lc.head_mass(g), r.mass)
            assert p_lc.capacities[g] >= p_lc.lengths[g]
        sizes = [len(t) for t in p_lc.tables]
        assert p_lc.block_range() == (min(sizes), max(sizes))  # from the capacity array, always the tables' own


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_cache_equals_the_reference_under_random_operations(seed, block_size):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    pool = BlockPool(4096 // block_size + 64, block_size, D, torch.float32, "cpu")
    paged = PagedKVCache(pool, L, HKV, capacity=4, track_mass=True)
    ragged = ReferenceCache()
    position = 0
    for _ in range(40):
        op = rng.choice(["append", "append", "reserve", "compact", "compact_layer", "mass"])
        if op == "append":
            T = rng.randint(1, 9)
            paged.make_room(T)
            pos = torch.arange(position, position + T)
            for layer in range(L):
                k, v = torch.randn(HKV, T, D, generator=gen), torch.randn(HKV, T, D, generator=gen)
                paged.append(layer, k, v, pos)
                ragged.append(layer, k, v, pos)
            position += T
        elif op == "reserve":
            extra, headroom = rng.randint(0, 20), rng.randint(0, 20)
            paged.make_room(extra, headroom)
        elif op == "mass":
            layer, g = rng.randrange(L), rng.randrange(HKV)
            n = paged.layers[layer].lengths[g]
            values = torch.rand(n, generator=gen)
            paged.layers[layer].set_head_mass(g, values)
            ragged.set_head_mass(layer, g, values)
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
                    ragged.compact_layer(layer, keep)
            if op == "compact":
                paged.compact(keep_all, headroom)
                for layer, keep in enumerate(keep_all):
                    ragged.compact_layer(layer, keep)
        _check_equal(paged, ragged)
    held = paged.blocks_held()
    assert pool.num_used == held and paged.peak_bytes >= paged.bytes_allocated()
    paged.release()
    assert pool.num_used == 0 and paged.lengths() == [[0] * HKV for _ in range(L)]
    assert all(lc.slots(g).numel() == 0 for lc in paged.layers for g in range(HKV))


def test_the_peak_follows_every_growth_and_not_a_shrink():
    pool = BlockPool(256, 4, D, torch.float32, "cpu")
    cache = PagedKVCache(pool, L, HKV)
    cache.make_room(10)
    grown = cache.bytes_allocated()
    assert cache.peak_bytes == grown > 0
    cache.compact([[torch.arange(2) for _ in range(HKV)] for _ in range(L)], headroom=0)
    assert cache.bytes_allocated() < grown and cache.peak_bytes == grown
    cache.compact_layer(0, [torch.arange(2) for _ in range(HKV)], headroom=40)  # grows one layer past the peak
    assert cache.bytes_allocated() > grown and cache.peak_bytes == cache.bytes_allocated()

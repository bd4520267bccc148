"""One sequence's KV cache as block tables into the shared pool: ragged per (layer, kv head).

Storage is borrowed from a BlockPool: kv head g of a layer owns a list of blocks and a length; its first
`length` entries, in position order, are its retained tokens (keys RoPE'd, with their absolute positions).
Different heads may hold different numbers of tokens (Ada-KV, LaProx).

Compaction is in place: the kept entries of a segment are gathered to the front of its own blocks, then
the blocks past kept + headroom go back to the pool at once (or, rarely, blocks are added for a headroom
larger than what the segment had). Nothing is masked and nothing copies the whole cache: a compaction
reads and writes only the kept entries, and decode-time eviction never allocates.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import Tensor

from kvx.runtime.cache.pool import BlockPool


# Table versions, unique across every layer of every cache: a batched step's buffers (runtime/engine/batch_step.py)
# rewrite a segment's block-table row only when the version it last saw has changed.
_TABLE_VERSIONS = itertools.count(1)


class PagedLayer:
    """One layer's segments: a block table and a length per kv head, on the host (no device syncs).

    The lengths and capacities are rows of the owning cache's [layers, kv heads] arrays, so the batched
    step reads and advances a whole sequence in one array operation instead of a Python loop per layer.
    `lengths` reads as a list and is set as a whole (`lc.lengths = [...]`): item assignment on the list it
    returns would change a copy.
    """

    def __init__(self, pool: BlockPool, num_kv_heads: int, track_mass: bool, owner: "PagedKVCache",
                 lengths: np.ndarray, capacities: np.ndarray, shared: np.ndarray):
        self.pool = pool
        self.owner = owner
        self.version = next(_TABLE_VERSIONS)  # changes whenever a table does (and the owner's with it)
        self.tables: list[list[int]] = [[] for _ in range(num_kv_heads)]
        self._len = lengths  # views into owner's arrays
        self._cap = capacities
        # Leading blocks of each table that belong to a stored context (runtime/contexts/resident.py), read
        # only and shared with other requests: never written, never freed by this cache.
        self._shared = shared
        self.track_mass = track_mass
        # Each table as a device tensor, built on first use after it changed: slots() runs for every head
        # at every append and eviction, and building the tensor from the list each time dominated them.
        self._table_tensors: list[Tensor | None] = [None] * num_kv_heads
        self._all_slots: list[Tensor | None] = [None] * num_kv_heads  # slots(g) of the table tensor above

    @property
    def lengths(self) -> list[int]:
        return self._len.tolist()

    @lengths.setter
    def lengths(self, values) -> None:
        self._len[:] = values

    @property
    def capacities(self) -> list[int]:
        return self._cap.tolist()

    def _table_changed(self, g: int) -> None:
        self._cap[g] = len(self.tables[g]) * self.pool.block_size
        self.version = self.owner.version = next(_TABLE_VERSIONS)
        self._table_tensors[g] = None

    def blocks_held(self) -> int:
        """Blocks this layer holds in the pool (its own: a stored context's shared blocks are not)."""
        return sum(len(t) for t in self.tables) - int(self._shared.sum())

    def block_range(self) -> tuple[int, int]:
        """(fewest, most) blocks a head's table holds (from the capacities, kept with every table change)."""
        B = self.pool.block_size
        return int(self._cap.min()) // B, int(self._cap.max()) // B

    def slots(self, g: int, idx: Tensor | None = None) -> Tensor:
        """Flat pool slots of head g's entries `idx` (default: all of its first length entries)."""
        B = self.pool.block_size
        dev = self.pool.device
        table = self._table_tensors[g]
        if table is None:
            table = self._table_tensors[g] = torch.tensor(self.tables[g], dtype=torch.long, device=dev)
            self._all_slots[g] = None
        if idx is None:
            # A segment's slots depend only on its table and length: an eviction reads them several times.
            memo, n = self._all_slots[g], int(self._len[g])
            if memo is not None and memo.numel() == n:
                return memo
            idx = torch.arange(n, device=dev)
            memo = table[idx // B] * B + idx % B if idx.numel() else idx
            self._all_slots[g] = memo
            return memo
        idx = idx.to(dev).long()
        return table[idx // B] * B + idx % B if idx.numel() else idx

    def is_uniform(self) -> bool:
        return bool((self._len == self._len[0]).all())

    def head(self, g: int) -> tuple[Tensor, Tensor, Tensor]:
        s = self.slots(g)
        p = self.pool
        return p.k_flat[s], p.v_flat[s], p.pos_flat[s]

    def head_positions(self, g: int) -> Tensor:
        return self.pool.pos_flat[self.slots(g)]

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        """[Hkv, n, d] K and V (gathered) and the [n] positions; only valid when is_uniform()."""
        heads = [self.head(g) for g in range(len(self.tables))]
        return torch.stack([h[0] for h in heads]), torch.stack([h[1] for h in heads]), heads[0][2]

    def head_mass(self, g: int) -> Tensor:
        if not self.track_mass:
            return torch.zeros(self.lengths[g], device=self.pool.device)
        return self.pool.mass_flat[self.slots(g)]

    def set_head_mass(self, g: int, values: Tensor) -> None:
        """The mass of head g's first len(values) entries."""
        if self.track_mass:
            idx = torch.arange(values.numel(), device=self.pool.device)
            self.pool.mass_flat[self.slots(g, idx)] = values.to(self.pool.mass.device, torch.float32)

    # -- growth ------------------------------------------------------------------------------------
    def resize(self, g: int, capacity: int) -> None:
        """Hold exactly enough blocks for `capacity` entries (never fewer than the length)."""
        want = self.pool.blocks_for(max(capacity, self.lengths[g]))
        assert want >= self._shared[g], "a cache never gives back a stored context's shared blocks"
        have = len(self.tables[g])
        if want < have:
            self.pool.free(self.tables[g][want:])
            del self.tables[g][want:]
        elif want > have:
            self.tables[g].extend(self.pool.allocate(want - have))
        else:
            return
        self._table_changed(g)

    def release(self) -> None:
        for g, t in enumerate(self.tables):
            self.pool.free(t[int(self._shared[g]):])  # shared blocks stay with their context
            t.clear()
            self._table_changed(g)
        self._len[:] = 0
        self._shared[:] = 0


class PagedKVCache:
    """KV cache of one sequence in a shared BlockPool, ragged per (layer, kv head)."""

    def __init__(self, pool: BlockPool, num_layers: int, num_kv_heads: int, capacity: int = 0,
                 track_mass: bool = False):
        self.pool = pool
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = pool.head_dim
        self.dtype = pool.dtype
        self.device = pool.device
        self.track_mass = track_mass
        self.compacted = False  # heads may hold different positions once a compaction ran
        # Entries held and entries the blocks can hold, per (layer, kv head); the layers' rows are views.
        self.length_array = np.zeros((num_layers, num_kv_heads), dtype=np.int64)
        self.capacity_array = np.zeros((num_layers, num_kv_heads), dtype=np.int64)
        self.shared_array = np.zeros((num_layers, num_kv_heads), dtype=np.int64)  # see PagedLayer._shared
        self.version = next(_TABLE_VERSIONS)  # the newest of its layers' table versions
        self.layers = [PagedLayer(pool, num_kv_heads, track_mass, self, self.length_array[i], self.capacity_array[i],
                                  self.shared_array[i]) for i in range(num_layers)]
        # Bytes the same request holds in another cache meanwhile (the compressed context an answer's copy
        # was taken from, runtime/cache/snapshot.py): counted in the peak, which is the request's, not this object's.
        self.beside = 0
        self.peak_bytes = 0
        if capacity:
            self.make_room(capacity)

    # -- accounting -------------------------------------------------------------------------------
    def blocks_held(self) -> int:
        return sum(lc.blocks_held() for lc in self.layers)

    def bytes_allocated(self) -> int:
        """K + V bytes of the blocks this sequence holds (its share of the pool)."""
        return self.blocks_held() * self.pool.block_bytes

    def shared_bytes(self) -> int:
        """K + V bytes of a stored context's blocks this cache reads without holding them."""
        return int(self.shared_array.sum()) * self.pool.block_bytes

    def bytes_used(self) -> int:
        """K + V bytes of the entries currently held (excludes free slots in the blocks)."""
        return self.total_entries() * self.pool.block_bytes // self.pool.block_size

    def total_entries(self) -> int:
        return int(self.length_array.sum())

    def lengths(self) -> list[list[int]]:
        return self.length_array.tolist()

    def _note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.bytes_allocated() + self.beside)

    # -- growth and appends -----------------------------------------------------------------------
    def make_room(self, extra: int, headroom: int = 0) -> None:
        """Make sure every segment can take `extra` more tokens; grows by extra + headroom when it can't."""
        if int((self.capacity_array - self.length_array).min()) >= extra:
            return  # every segment has room: the usual case, admission reserved the headroom
        grew = False
        B = self.pool.block_size
        for lc in self.layers:
            if max(lc.lengths) + extra <= lc.block_range()[0] * B:
                continue
            for g, n in enumerate(lc.lengths):
                if n + extra > len(lc.tables[g]) * B:
                    lc.resize(g, n + extra + headroom)
                    grew = True
        if grew:  # the peak only moves when blocks were added (this runs for every sequence at every step)
            self._note_peak()

    def append(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> None:
        """Append T tokens to every head of a layer. k, v: [Hkv, T, d]; positions: [T]."""
        lc = self.layers[layer]
        Hkv, T, d = k.shape
        dev = self.device
        slots = torch.cat([lc.slots(g, torch.arange(n, n + T, device=dev)) for g, n in enumerate(lc.lengths)])
        p = self.pool
        p.k_flat[slots] = k.reshape(Hkv * T, d).to(p.dtype)
        p.v_flat[slots] = v.reshape(Hkv * T, d).to(p.dtype)
        p.pos_flat[slots] = positions.to(dev, torch.int64).repeat(Hkv)
        lc._len += T

    def advance(self, n: int = 1) -> None:
        """Count n more entries in every segment, written by the caller (the batched decode step)."""
        self.length_array += n

    def most_blocks(self) -> int:
        """The most blocks any one segment holds (the batched step's table width)."""
        return int(self.capacity_array.max()) // self.pool.block_size

    # -- compaction -------------------------------------------------------------------------------
    def compact(self, keep: list[list[Tensor]], headroom: int) -> None:
        """Keep only the given entries (per layer, per head: sorted indices into the head's segment),
        in place; then each segment holds exactly the blocks for len(keep) + headroom entries."""
        for layer in range(self.num_layers):
            self.compact_layer(layer, keep[layer], headroom)

    def compact_layer(self, layer: int, keep: list[Tensor], headroom: int) -> None:
        assert not self.shared_array.any(), "a cache over a shared stored context is never compacted"
        self.compacted = True
        lc = self.layers[layer]
        p = self.pool
        dev = self.device
        held_before = lc.blocks_held()
        src = torch.cat([lc.slots(g, idx) for g, idx in enumerate(keep)])
        # Read every kept entry before writing any (a kept entry may sit where another lands).
        k, v, pos = p.k_flat[src], p.v_flat[src], p.pos_flat[src]
        mass = p.mass_flat[src] if lc.track_mass else None
        counts = [int(idx.numel()) for idx in keep]
        old_caps = lc.capacities
        lc.lengths = counts
        # Shrink every head before growing any, so the pool never holds more than before or after.
        order = sorted(range(len(counts)), key=lambda g: lc.pool.blocks_for(counts[g] + headroom) - len(lc.tables[g]))
        for g in order:
            lc.resize(g, counts[g] + headroom)
        dst = torch.cat([lc.slots(g, torch.arange(n, device=dev)) for g, n in enumerate(counts)])
        p.k_flat[dst], p.v_flat[dst], p.pos_flat[dst] = k, v, pos
        if mass is not None:
            p.mass_flat[dst] = mass
            # Slots past a length must read zero mass: the entries that moved away leave stale values.
            tails = [lc.slots(g, torch.arange(n, min(c, lc.capacities[g]), device=dev))
                     for g, (n, c) in enumerate(zip(counts, old_caps))]
            p.mass_flat[torch.cat(tails)] = 0.0
        if lc.blocks_held() > held_before:  # a compaction that only shrinks cannot raise the peak
            self._note_peak()

    # -- lifetime ---------------------------------------------------------------------------------
    def clone(self, track_mass: bool | None = None) -> "PagedKVCache":
        """An independent copy in fresh blocks of the same pool."""
        track = self.track_mass if track_mass is None else track_mass
        new = PagedKVCache(self.pool, self.num_layers, self.num_kv_heads, track_mass=track)
        new.compacted = self.compacted
        p = self.pool
        for src_lc, dst_lc in zip(self.layers, new.layers):
            for g, n in enumerate(src_lc.lengths):
                dst_lc.resize(g, src_lc.capacities[g])
            dst_lc.lengths = src_lc.lengths
            src = torch.cat([src_lc.slots(g) for g in range(self.num_kv_heads)])
            dst = torch.cat([dst_lc.slots(g) for g in range(self.num_kv_heads)])
            p.k_flat[dst], p.v_flat[dst], p.pos_flat[dst] = p.k_flat[src], p.v_flat[src], p.pos_flat[src]
            if track and src_lc.track_mass:
                p.mass_flat[dst] = p.mass_flat[src]
        new._note_peak()
        return new

    @classmethod
    def copy_of(cls, src: "PagedKVCache", pool: BlockPool, extra: int, keep: list[list[Tensor]] | None = None,
                track_mass: bool | None = None) -> "PagedKVCache":
        """A copy of `src` (of this pool or another) in `pool`, with room for `extra` more tokens per segment;
        `keep` (per layer, per head: sorted indices into the segment) copies only those entries, so a
        compressed copy of a shared prefill (an eval variant) reads only what it keeps and never holds a
        full clone. `track_mass` (default: src's) gives the copy a mass of its own (zeros if src has none)."""
        track = src.track_mass if track_mass is None else track_mass
        new = cls(pool, src.num_layers, src.num_kv_heads, track_mass=track)
        new.compacted = src.compacted or keep is not None
        H = src.num_kv_heads
        for layer, (s_lc, d_lc) in enumerate(zip(src.layers, new.layers)):
            idx = [None] * H if keep is None else keep[layer]
            counts = s_lc.lengths if keep is None else [int(i.numel()) for i in idx]
            for g, n in enumerate(counts):
                d_lc.resize(g, n + extra)
            d_lc.lengths = counts
            dst = torch.cat([d_lc.slots(g) for g in range(H)])
            srcs = torch.cat([s_lc.slots(g, idx[g]) for g in range(H)])
            sp = src.pool
            pool.k_flat[dst] = sp.k_flat[srcs].to(pool.dtype)
            pool.v_flat[dst] = sp.v_flat[srcs].to(pool.dtype)
            pool.pos_flat[dst] = sp.pos_flat[srcs]
            if track and src.track_mass:
                pool.mass_flat[dst] = sp.mass_flat[srcs]
        new._note_peak()
        return new

    @classmethod
    def sharing(cls, base: "PagedKVCache", extra: int) -> "PagedKVCache":
        """A cache that reads `base` (a stored context resident in the pool) without copying it: each
        segment's table begins with base's full blocks, shared read-only, then blocks of its own for base's
        partly filled last block (copied: nothing this cache writes lands in a shared block) and `extra`
        more entries. Releasing it frees only its own blocks. Mass is not tracked: a policy that evicts
        while decoding answers from a private copy instead (nothing may rank or move shared entries)."""
        pool = base.pool
        B = pool.block_size
        new = cls(pool, base.num_layers, base.num_kv_heads)
        new.compacted = True
        for s_lc, d_lc in zip(base.layers, new.layers):
            counts = s_lc.lengths
            partial_src, partial_dst = [], []
            for g, n in enumerate(counts):
                full = n // B
                d_lc.tables[g] = list(s_lc.tables[g][:full])
                d_lc._shared[g] = full
                d_lc._table_changed(g)
                d_lc.resize(g, n + extra)
                if n % B:
                    idx = torch.arange(full * B, n, device=pool.device)
                    partial_src.append(s_lc.slots(g, idx))
                    partial_dst.append(d_lc.slots(g, idx))
            d_lc.lengths = counts
            if partial_src:
                src, dst = torch.cat(partial_src), torch.cat(partial_dst)
                pool.k_flat[dst], pool.v_flat[dst], pool.pos_flat[dst] = pool.k_flat[src], pool.v_flat[src], pool.pos_flat[src]
        new._note_peak()
        return new

    def rewind(self, lengths: list[list[int]]) -> None:
        """Each head back to the first `lengths` (from lengths()) tokens; its blocks stay reserved."""
        self.length_array[:] = lengths

    def release(self) -> None:
        """Every block back to the pool, at once."""
        for lc in self.layers:
            lc.release()

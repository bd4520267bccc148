"""The ragged KV cache: per layer, flat K/V pools with one segment per kv head.

Kv head g of a layer owns slots [start[g], start[g] + capacity[g]); its first length[g] slots hold its
retained tokens in position order, keys already RoPE'd, with their absolute positions in `pos`. Different
heads may hold different numbers of tokens (Ada-KV, LaProx), and after compaction the pools are
reallocated to exactly kept + headroom slots per head, so the bytes held follow the budget. Nothing is
masked: an evicted entry is gone.

Lengths live on the host (Python ints) as well as on the device: the host copy drives allocation and the
CPU path without device syncs; the device copy feeds kernels and CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvx.kernels import ops


@dataclass
class LayerCache:
    k: Tensor  # [slots, d]
    v: Tensor  # [slots, d]
    pos: Tensor  # [slots] int64 absolute positions
    start: Tensor  # [Hkv] int32 (device)
    length: Tensor  # [Hkv] int32 (device)
    starts: list[int]  # host mirrors
    lengths: list[int]
    capacities: list[int]
    key_mass: Tensor | None = None  # [slots] float32, decode-time attention mass (H2O/TOVA)

    @property
    def slots(self) -> int:
        return self.k.shape[0]

    def is_uniform(self) -> bool:
        """All heads hold the same number of tokens at a common stride: the pool views as [Hkv, cap, d]."""
        cap = self.capacities[0]
        return (
            all(c == cap for c in self.capacities)
            and all(s == g * cap for g, s in enumerate(self.starts))
            and all(n == self.lengths[0] for n in self.lengths)
        )

    def head(self, g: int) -> tuple[Tensor, Tensor, Tensor]:
        s, n = self.starts[g], self.lengths[g]
        return self.k[s:s + n], self.v[s:s + n], self.pos[s:s + n]

    def head_positions(self, g: int) -> Tensor:
        s = self.starts[g]
        return self.pos[s:s + self.lengths[g]]

    @property
    def track_mass(self) -> bool:
        return self.key_mass is not None

    def head_mass(self, g: int) -> Tensor:
        """Decode-time attention mass of head g's entries (zeros when the cache does not track it)."""
        s, n = self.starts[g], self.lengths[g]
        if self.key_mass is None:
            return torch.zeros(n, device=self.k.device)
        return self.key_mass[s:s + n]

    def set_head_mass(self, g: int, values: Tensor) -> None:
        """The mass of head g's first len(values) entries."""
        if self.key_mass is not None:
            s = self.starts[g]
            self.key_mass[s:s + values.numel()] = values.to(self.key_mass.device, torch.float32)

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        """[Hkv, n, d] views of K and V and the [n] positions; only valid when is_uniform()."""
        hkv, cap, n = len(self.starts), self.capacities[0], self.lengths[0]
        d = self.k.shape[1]
        return (self.k.view(hkv, cap, d)[:, :n], self.v.view(hkv, cap, d)[:, :n], self.pos[:n])


def _new_layer(hkv: int, capacities: list[int], d: int, dtype, device, track_mass: bool) -> LayerCache:
    starts = [0]
    for c in capacities[:-1]:
        starts.append(starts[-1] + c)
    slots = sum(capacities)
    return LayerCache(
        k=torch.zeros(slots, d, dtype=dtype, device=device),
        v=torch.zeros(slots, d, dtype=dtype, device=device),
        pos=torch.zeros(slots, dtype=torch.int64, device=device),
        start=torch.tensor(starts, dtype=torch.int32, device=device),
        length=torch.zeros(hkv, dtype=torch.int32, device=device),
        starts=starts,
        lengths=[0] * hkv,
        capacities=list(capacities),
        key_mass=torch.zeros(slots, dtype=torch.float32, device=device) if track_mass else None,
    )


class RaggedKVCache:
    """KV cache for one sequence, ragged per (layer, kv head)."""

    contiguous = True  # each segment is one contiguous run of slots (the ragged decode kernel's layout)

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, capacity: int, track_mass: bool = False):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.track_mass = track_mass
        self.compacted = False  # heads may hold different positions once a compaction ran
        self.layers = [
            _new_layer(num_kv_heads, [capacity] * num_kv_heads, head_dim, dtype, self.device, track_mass)
            for _ in range(num_layers)
        ]
        # Bytes the same request holds in another cache meanwhile (the compressed context an answer's copy
        # was taken from, runtime/snapshot.py): counted in the peak, which is the request's, not this object's.
        self.beside = 0
        self.peak_bytes = self.bytes_allocated()

    # -- accounting -------------------------------------------------------------------------------
    def bytes_allocated(self) -> int:
        """K + V bytes actually allocated (pools), not a formula over lengths."""
        return sum(lc.k.numel() * lc.k.element_size() + lc.v.numel() * lc.v.element_size() for lc in self.layers)

    def bytes_used(self) -> int:
        """K + V bytes of the entries currently held (excludes free headroom)."""
        per_entry = 2 * self.head_dim * torch.empty((), dtype=self.dtype).element_size()
        return per_entry * self.total_entries()

    def total_entries(self) -> int:
        return sum(sum(lc.lengths) for lc in self.layers)

    def lengths(self) -> list[list[int]]:
        return [list(lc.lengths) for lc in self.layers]

    def _note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.bytes_allocated() + self.beside)

    # -- growth and appends -----------------------------------------------------------------------
    def reserve(self, extra: int, headroom: int = 0) -> None:
        """Make sure every segment can take `extra` more tokens; grows by extra + headroom when it can't."""
        for i, lc in enumerate(self.layers):
            if all(n + extra <= c for n, c in zip(lc.lengths, lc.capacities)):
                continue
            caps = [max(c, n + extra + headroom) for n, c in zip(lc.lengths, lc.capacities)]
            keep = [torch.arange(n, device=self.device) for n in lc.lengths]
            self.layers[i] = self._rebuild(lc, keep, caps)
        self._note_peak()

    def append(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> None:
        """Append T tokens to every head of a layer. k, v: [Hkv, T, d]; positions: [T]."""
        lc = self.layers[layer]
        T = k.shape[1]
        ops.cache_append(lc.k, lc.v, lc.pos, lc.start, lc.length, k, v, positions)
        # key_mass needs no reset here: slots past a segment's length are always zero (fresh pools are
        # zeroed and nothing writes past the length), which also keeps this CUDA-graph friendly.
        lc.lengths = [n + T for n in lc.lengths]

    # -- compaction ---------------------------------------------------------------------------------
    def compact(self, keep: list[list[Tensor]], headroom: int) -> None:
        """Keep only the given entries (per layer, per head: sorted indices into the head's segment).

        The pools are reallocated to exactly len(keep) + headroom slots per head, so memory shrinks.
        """
        self.compacted = True
        for i, lc in enumerate(self.layers):
            caps = [int(idx.numel()) + headroom for idx in keep[i]]
            self.layers[i] = self._rebuild(lc, keep[i], caps)

    def compact_layer(self, layer: int, keep: list[Tensor], headroom: int) -> None:
        """compact() for one layer. When every segment keeps its capacity (decode-time eviction back to the
        same budget + slack, every round after the first), the kept entries are written into the layer's
        own pools instead: same addresses, so a captured decode graph stays valid (runtime/graphs.py)."""
        self.compacted = True
        lc = self.layers[layer]
        caps = [int(idx.numel()) + headroom for idx in keep]
        new = self._rebuild(lc, keep, caps)
        if caps != lc.capacities:
            self.layers[layer] = new
            return
        for old, fresh in ((lc.k, new.k), (lc.v, new.v), (lc.pos, new.pos), (lc.key_mass, new.key_mass),
                           (lc.length, new.length)):
            if old is not None:
                old.copy_(fresh)  # the fresh pools are zero past each length, as the invariant wants
        lc.lengths = new.lengths

    def _rebuild(self, lc: LayerCache, keep: list[Tensor], capacities: list[int]) -> LayerCache:
        new = _new_layer(self.num_kv_heads, capacities, self.head_dim, self.dtype, self.device, lc.key_mass is not None)
        new_slots = new.slots
        new.k = ops.compact_gather(lc.k, lc.start, keep, new.start, new_slots)
        new.v = ops.compact_gather(lc.v, lc.start, keep, new.start, new_slots)
        new.pos = ops.compact_gather(lc.pos, lc.start, keep, new.start, new_slots)
        if lc.key_mass is not None:
            new.key_mass = ops.compact_gather(lc.key_mass, lc.start, keep, new.start, new_slots)
        new.lengths = [int(idx.numel()) for idx in keep]
        new.length = torch.tensor(new.lengths, dtype=torch.int32, device=self.device)
        return new

    def rewind(self, lengths: list[list[int]]) -> None:
        """Each head back to the first `lengths` (from lengths()) tokens: drops what was appended since."""
        for lc, n in zip(self.layers, lengths):
            lc.lengths = list(n)
            lc.length.copy_(torch.tensor(n, dtype=torch.int32))  # in place: a captured graph reads it by address

    def release(self) -> None:
        """Nothing to hand back: the pools are this cache's own and go when it does (PagedKVCache's twin)."""

    def clone(self, track_mass: bool | None = None) -> "RaggedKVCache":
        """An independent copy (fresh pools); track_mass switches the decode-time mass buffer on or off."""
        import copy

        track = self.track_mass if track_mass is None else track_mass
        new = copy.copy(self)
        new.track_mass = track
        new.layers = []
        for lc in self.layers:
            c = copy.copy(lc)
            c.k, c.v, c.pos = lc.k.clone(), lc.v.clone(), lc.pos.clone()
            c.start, c.length = lc.start.clone(), lc.length.clone()
            c.starts, c.lengths, c.capacities = list(lc.starts), list(lc.lengths), list(lc.capacities)
            if track:
                c.key_mass = lc.key_mass.clone() if lc.key_mass is not None else torch.zeros(
                    lc.slots, dtype=torch.float32, device=self.device)
            else:
                c.key_mass = None
            new.layers.append(c)
        new.peak_bytes = new.bytes_allocated()
        return new

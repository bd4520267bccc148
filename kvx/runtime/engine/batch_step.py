"""One decode step for many sequences at once, over static buffers; on a GPU, captured as CUDA graphs.

The model has no batch dimension; it does not need one. S sequences' next tokens go through it as S
"tokens" with their own positions: embeddings, projections, RoPE, MLP and the LM head run once over
[S, D], so the weights are read once per step for the whole batch. Only attention differs: each token's
K/V go to the end of its sequence's segments and each (sequence, kv head) segment is attended through its
block table (ops.paged_decode_attention: Triton on a GPU, the PyTorch reference elsewhere).

Everything the step reads lives in buffers that outlive it (StaticStep): token ids, positions and, per
layer, the block table [S·Hkv, W] and the length before the append of every segment. The step computes
the append slots on the device from them, writes the new K/V, attends with a grid fixed by W (max_len =
W·B) and never syncs with the host. So on a GPU it is captured once per (batch bucket, width bucket) and
replayed: admissions, compactions and decode-time eviction only change what the buffers hold, and the pool
never moves. A batch smaller than its bucket is padded with empty sequences whose segments point at the
pool's scratch block (their appends land there; their outputs are dropped).

Host work per step: the lengths (one int per segment and layer), ids and positions; block tables are
rewritten only for the layers of the sequences whose tables changed (PagedLayer.version). On the CPU
nothing is captured and nothing is padded: buffers are sized to the batch as it is.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from torch import Tensor

from kvx.kernels import ops

_MASS_MODE = {"accumulate": 1, "last": 2}  # paged_decode_attention's mass_mode codes
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_KEEP_ENTRIES = 8  # buffer sets (and graphs) kept per stepper, least recently used dropped first


def batch_bucket(n: int) -> int:
    """The captured batch size that holds n sequences."""
    for b in BATCH_BUCKETS:
        if n <= b:
            return b
    top = BATCH_BUCKETS[-1]
    return -(-n // top) * top


def width_bucket(blocks: int) -> int:
    """Block-table width (blocks per segment) captured for segments of up to `blocks` blocks."""
    w = 1
    while w < blocks:
        w *= 2
    return w


class StaticStep:
    """The buffers of one (batch size, width, mass) shape and the step that reads only them."""

    def __init__(self, engine, pool, size: int, width: int, mass: bool):
        cfg = engine.config
        self.engine, self.pool = engine, pool
        self.size, self.width = size, width
        L, Hkv, H, d = cfg.num_layers, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim
        self.num_kv_heads = Hkv
        N = size * Hkv
        dev = engine.device
        self.ids = torch.zeros(size, dtype=torch.long, device=dev)
        self.pos = torch.zeros(size, dtype=torch.long, device=dev)
        self.tables = torch.full((L, N, width), pool.scratch, dtype=torch.int32, device=dev)
        self.lengths = torch.zeros((L, N), dtype=torch.int32, device=dev)
        self.mass_mode = torch.zeros(N, dtype=torch.int32, device=dev) if mass else None
        self.q_out = torch.zeros((L, H, size, d), dtype=engine.dtype, device=dev)  # AhaKV's recent queries
        # A step that may be captured always writes them (the graph is shared by every batch of its shape);
        # an eager one (BatchStepper sets `eager`) only when a request of the batch keeps recent queries.
        self.eager = False
        self.copy_queries = True
        self._rows = torch.arange(N, device=dev)
        # On the CPU the attention call writes the step's new entries itself (the C kernel in the same call).
        self.appends_in_kernel = ops.appends_in_attention(torch.device(dev))
        # The host mirror of the tables (the tables themselves on the CPU); pinned so the copy is async.
        if dev.type == "cpu":
            self._host_tables = self.tables
        else:
            self._host_tables = torch.full((L, N, width), pool.scratch, dtype=torch.int32, pin_memory=True)
        # Per slot: the (cache version, version per layer) its tables were last written at.
        self._seen: list[tuple[int, list[int]] | None] = [None] * size
        # The lengths' host side, [layers, size, kv heads].
        self._host_lengths = np.zeros((L, size, Hkv), dtype=np.int32)
        self.graph = None
        self.logits: Tensor | None = None
        # Eager on the CPU: per layer each segment's first slot when every segment's blocks are consecutive
        # (the reference then reads slices of the pool), recomputed when a table changes; else None.
        self._row_starts: list[list[int]] | None = None

    # -- host side ----------------------------------------------------------------------------------
    def load(self, reqs: list, tokens: list[int]) -> None:
        """Write this step's inputs into the buffers (tables only where they changed)."""
        S, Hkv = len(reqs), self.num_kv_heads
        scratch = self.pool.scratch
        host = self._host_tables
        dirty = False
        for i in range(self.size):
            if i >= S:
                if self._seen[i] is not None:  # a sequence left this slot: point it at scratch again
                    host[:, i * Hkv:(i + 1) * Hkv].fill_(scratch)
                    self._seen[i] = None
                    dirty = True
                continue
            cache = reqs[i].cache
            seen = self._seen[i]
            if seen is not None and seen[0] == cache.version:  # no table of this sequence changed
                continue
            now = [lc.version for lc in cache.layers]
            for layer, lc in enumerate(cache.layers):
                if seen is not None and seen[1][layer] == now[layer]:
                    continue
                for g, t in enumerate(lc.tables):
                    row = host[layer, i * Hkv + g]
                    row[:len(t)] = torch.tensor(t, dtype=torch.int32)
                    row[len(t):] = scratch
            self._seen[i] = (cache.version, now)
            dirty = True
        if dirty and host is not self.tables:
            self.tables.copy_(host, non_blocking=True)
        if dirty and self.eager and host is self.tables:
            self._row_starts = _row_starts(reqs, self.pool.block_size)
            self.copy_queries = any(r.decode_mode == "recent_queries" for r in reqs)
        # Every sequence's [layers, kv heads] lengths into the [layers, size · kv heads] buffer, in one op.
        lengths = self._host_lengths
        lengths[:, :S] = np.stack([r.cache.length_array for r in reqs], axis=1)
        lengths[:, S:] = 0  # padding slots (a sequence may have left one since the last step)
        self.lengths.copy_(torch.from_numpy(lengths).view(self.lengths.shape))
        pad = self.size - S
        self.ids.copy_(torch.tensor(list(tokens) + [0] * pad, dtype=torch.long), non_blocking=True)
        self.pos.copy_(torch.tensor([r.position for r in reqs] + [0] * pad, dtype=torch.long), non_blocking=True)
        if self.mass_mode is not None:
            modes = [_MASS_MODE.get(r.decode_mode, 0) for r in reqs for _ in range(Hkv)] + [0] * (pad * Hkv)
            self.mass_mode.copy_(torch.tensor(modes, dtype=torch.int32), non_blocking=True)

    # -- device side --------------------------------------------------------------------------------
    def run(self) -> Tensor:
        """The step itself: logits [size, V]. Reads only the buffers and the pool (capturable)."""
        eng, pool = self.engine, self.pool
        cfg = eng.config
        Hkv, G, d = cfg.num_kv_heads, eng.group, cfg.head_dim
        B = pool.block_size
        size, N = self.size, self.size * Hkv
        q_pos = self.pos.repeat_interleave(Hkv)

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, q_pre: Tensor) -> Tensor:
            tables, n = self.tables[layer], self.lengths[layer]
            new = (k.transpose(0, 1).reshape(N, d), v.transpose(0, 1).reshape(N, d), q_pos)
            if not self.appends_in_kernel:  # a captured GPU step keeps the writes it was captured with
                nl = n.long()
                slots = tables[self._rows, nl // B].long() * B + nl % B  # entry `length` of every segment
                pool.k_flat[slots] = new[0].to(pool.dtype)
                pool.v_flat[slots] = new[1].to(pool.dtype)
                pool.pos_flat[slots] = q_pos
            out = ops.paged_decode_attention(
                q.transpose(0, 1).reshape(N, G, d), pool.k, pool.v, tables, n + 1, eng.scale,
                mass_pool=pool.mass if self.mass_mode is not None else None, mass_mode=self.mass_mode,
                pos_pool=pool.pos, q_pos=q_pos, sliding_window=cfg.sliding_window_for(layer),
                max_len=self.width * B, row_starts=None if self._row_starts is None else self._row_starts[layer],
                new_entries=new if self.appends_in_kernel else None)
            if self.copy_queries:
                self.q_out[layer].copy_(q)
            return out.reshape(size, Hkv * G, d).transpose(0, 1)

        return eng.model(self.ids, self.pos, attend)

    def capture(self) -> None:
        """Record run() as a CUDA graph. The buffers hold a real step's inputs: the warm-up (Triton
        compiles, the allocator settles) writes that step's K/V where the replay will write them again, and
        runs with every mass mode off so that no attention mass is added twice."""
        saved = self.mass_mode.clone() if self.mass_mode is not None else None
        if saved is not None:
            self.mass_mode.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            self.run()
        torch.cuda.current_stream().wait_stream(side)
        if saved is not None:
            self.mass_mode.copy_(saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=_graph_pool(self.engine)), torch.inference_mode():
            self.logits = self.run()


def _row_starts(reqs: list, block_size: int) -> list[list[int]] | None:
    """Per layer, the first pool slot of every (sequence, kv head) segment, when each segment's blocks are
    consecutive ids (a lone request's usually are: its cache is allocated in one piece); else None."""
    layers = len(reqs[0].cache.layers)
    out = [[] for _ in range(layers)]
    for r in reqs:
        for layer, lc in enumerate(r.cache.layers):
            for t in lc.tables:
                if t and t != list(range(t[0], t[0] + len(t))):
                    return None
                out[layer].append(t[0] * block_size if t else 0)
    return out


def _graph_pool(engine):
    pool = getattr(engine, "_batch_graph_pool", None)
    if pool is None:
        pool = engine._batch_graph_pool = torch.cuda.graph_pool_handle()
    return pool


class BatchStepper:
    """Runs batched decode steps: picks the buffers for the batch's shape, replays its graph (captured on
    first use) on a GPU with graphs on, or runs the step eagerly."""

    def __init__(self, engine, pool, use_graphs: bool | None = None, pad: bool | None = None):
        self.engine, self.pool = engine, pool
        if use_graphs is None:
            use_graphs = engine.use_graphs and engine.device.type == "cuda"
        self.use_graphs = use_graphs
        self.pad = use_graphs if pad is None else pad  # only captured shapes need buckets
        self._entries: OrderedDict[tuple, StaticStep] = OrderedDict()
        self.captures = 0
        self.replays = 0
        self.capture_s = 0.0  # time spent capturing (Triton compiles included): benchmarks leave it out

    def _entry(self, reqs: list) -> StaticStep:
        S = len(reqs)
        blocks = max(r.cache.most_blocks() for r in reqs)
        mass = any(r.decode_mode in _MASS_MODE for r in reqs)
        key = (batch_bucket(S) if self.pad else S, width_bucket(blocks), mass)
        entry = self._entries.get(key)
        if entry is None:
            entry = StaticStep(self.engine, self.pool, *key)
            entry.eager = not self.use_graphs
            self._entries[key] = entry
            while len(self._entries) > _KEEP_ENTRIES:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        return entry

    def step(self, reqs: list, tokens: list[int]) -> Tensor:
        """Feed tokens[i] to reqs[i] (engine Requests over PagedKVCaches of one pool); returns logits [S, V]
        (a fresh tensor: the graph's output buffer is overwritten by the next replay)."""
        for r in reqs:
            r.cache.make_room(1)  # a no-op when admission reserved the headroom (the usual case)
        entry = self._entry(reqs)
        entry.load(reqs, tokens)
        if self.use_graphs:
            if entry.graph is None:
                t0 = time.perf_counter()
                entry.capture()
                if self.engine.device.type == "cuda":  # the capture's warm-up ran asynchronously
                    torch.cuda.synchronize()
                self.capture_s += time.perf_counter() - t0
                self.captures += 1
            entry.graph.replay()
            self.replays += 1
            logits = entry.logits
        else:
            logits = entry.run()
        S = len(reqs)
        for i, r in enumerate(reqs):
            r.cache.advance(1)
            r.position += 1
            if r.decode_mode == "recent_queries":  # AhaKV scores with the last r queries of each head
                r.push_recent_queries(entry.q_out[:, :, i:i + 1])
        return logits[:S].clone()


"""CUDA-graph capture of the decode step.

One decode step (every layer: projections, RoPE, cache append, ragged decode attention, MLP, LM head)
is captured once and replayed for every token: token id and position live in static device buffers,
segment lengths are advanced on the device by the append kernel, and the host mirrors of the lengths are
advanced after each replay. The graph is recaptured only when the cache's pools are reallocated (a
compaction or growth changes capacities): the graph reads the pools by address.

Policies that evict while decoding replay too. H2O's and TOVA's per-key mass is written by the captured
decode kernel into the cache's mass pool; the eviction between replays writes the kept entries back into
the same pools (batch_eviction.evict_sequence, or compact_layer for a scorer without a ranked rule: every
round after the first keeps each segment's capacity), so the graph is captured once; AhaKV's queries go to a static buffer and are appended to its recent
queries on the host after each replay. A sliding window is applied by the decode kernel from the
positions the cache keeps and the step's position buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvx.runtime.attend import make_attend


def graphs_supported(engine, req) -> bool:
    return engine.device.type == "cuda" and capturable(engine, req)


def capturable(engine, req) -> bool:
    """Whether req's decode step can be captured, whatever the device (tests emulate graphs on the CPU):
    the decode kernel's contiguous segments, sliding windows included."""
    return req.cache.contiguous


class DecodeGraph:
    def __init__(self, engine, req):
        self.engine = engine
        self.req = req
        dev = engine.device
        self.ids = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        cfg = engine.config
        # AhaKV: each layer's query of the step, appended to req.recent_q after the replay.
        self.queries = (torch.zeros(cfg.num_layers, cfg.num_heads, cfg.head_dim, dtype=engine.dtype, device=dev)
                        if req.decode_mode == "recent_queries" else None)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self._layout = None
        self.captures = 0

    def _layout_key(self):
        # Everything the captured kernels read or write by address.
        return tuple((lc.k.data_ptr(), lc.v.data_ptr(), lc.pos.data_ptr(), lc.start.data_ptr(), lc.length.data_ptr(),
                      0 if lc.key_mass is None else lc.key_mass.data_ptr(), max(lc.capacities))
                     for lc in self.req.cache.layers)

    def _run_model(self) -> Tensor:
        eng, req = self.engine, self.req
        attend = make_attend(eng, req, None, query_sink=self.queries)
        return eng.model(self.ids, self.pos, attend, last_only=True)[-1]

    def _capture(self) -> None:
        cache = self.req.cache
        saved_host = [list(lc.lengths) for lc in cache.layers]
        saved_dev = [lc.length.clone() for lc in cache.layers]
        # The warm-up adds a step's attention mass (H2O, TOVA) that the first replay adds again: put it back.
        saved_mass = [None if lc.key_mass is None else lc.key_mass.clone() for lc in cache.layers]

        def rewind():
            for lc, host, dev, mass in zip(cache.layers, saved_host, saved_dev, saved_mass):
                lc.lengths = list(host)
                lc.length.copy_(dev)
                if mass is not None:
                    lc.key_mass.copy_(mass)

        # Warm up on a side stream (Triton compiles, allocator settles), then undo the appended token.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            self._run_model()
        torch.cuda.current_stream().wait_stream(side)
        rewind()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = self._run_model()
        rewind()  # capture ran the host-side bookkeeping once; the device state was not touched
        self._layout = self._layout_key()
        self.captures += 1

    @torch.inference_mode()  # the cache's tensors are inference tensors (prefill, compaction): in-place updates need it
    def step(self, token: int) -> Tensor:
        """Feed one token at the request's next position; returns the next logits [V] (a static buffer)."""
        req = self.req
        req.cache.reserve(1, headroom=0)
        self.ids.fill_(token)
        self.pos.fill_(req.position)
        if self.graph is None or self._layout != self._layout_key():
            self._capture()
        self.graph.replay()
        for lc in req.cache.layers:
            lc.lengths = [n + 1 for n in lc.lengths]
        req.position += 1
        if self.queries is not None:
            req.push_recent_queries(self.queries.unsqueeze(2))
        return self.logits

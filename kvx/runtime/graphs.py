"""CUDA-graph capture of the decode step.

One decode step (every layer: projections, RoPE, cache append, ragged decode attention, MLP, LM head)
is captured once and replayed for every token: token id and position live in static device buffers,
segment lengths are advanced on the device by the append kernel, and the host mirrors of the lengths are
advanced after each replay. The graph is recaptured only when the cache's pools are reallocated (a
compaction or growth changes capacities): the graph reads the pools by address.

Not captured (the engine falls back to eager decode): policies that evict while decoding (their
compactions would force a recapture every few steps) and models with a sliding window (the windowed path
builds masks on the host).
"""

from __future__ import annotations

import torch
from torch import Tensor


def graphs_supported(engine, req) -> bool:
    return engine.device.type == "cuda" and capturable(engine, req)


def capturable(engine, req) -> bool:
    """Whether req's decode step can be captured, whatever the device (tests emulate graphs on the CPU)."""
    cfg = engine.config
    return req.decode_mode is None and all(cfg.sliding_window_for(i) is None for i in range(cfg.num_layers))


class DecodeGraph:
    def __init__(self, engine, req):
        self.engine = engine
        self.req = req
        dev = engine.device
        self.ids = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self._layout = None
        self.captures = 0

    def _layout_key(self):
        # Everything the captured kernels read or write by address.
        return tuple((lc.k.data_ptr(), lc.v.data_ptr(), lc.pos.data_ptr(), lc.start.data_ptr(), lc.length.data_ptr(),
                      max(lc.capacities)) for lc in self.req.cache.layers)

    def _run_model(self) -> Tensor:
        eng, req = self.engine, self.req
        return eng.model(self.ids, self.pos, eng._attend_fn(req, None), last_only=True)[-1]

    def _capture(self) -> None:
        cache = self.req.cache
        saved_host = [list(lc.lengths) for lc in cache.layers]
        saved_dev = [lc.length.clone() for lc in cache.layers]

        def rewind():
            for lc, host, dev in zip(cache.layers, saved_host, saved_dev):
                lc.lengths = list(host)
                lc.length.copy_(dev)

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
        return self.logits

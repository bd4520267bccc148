"""CUDA-graph capture and replay, emulated on the CPU, so that the engine's captured decode steps run here.

A CUDA graph records the kernels a region launches, with the addresses and scalar arguments they had
then, and replays exactly those launches later: nothing the region computes in Python runs again. Code
that is wrong under capture is wrong in one of a few ways, and this emulator makes each of them visible
without a GPU:

- a host read of device data inside the region (`.item()`, `bool(t)`, `nonzero`, a boolean mask index,
  `.tolist()`): illegal while capturing, so it raises `CaptureError` here;
- host data copied in inside the region (`torch.tensor([...])`): baked into the graph, so it raises too;
- a Python value (a length, a capacity, a grid size) read at capture and changed later: the replay here
  re-runs the recorded operations with the recorded arguments, so the stale value is used, as on a GPU;
- state written during capture: capture runs no kernel on a GPU, so here the in-place operations and the
  Triton launches a capture records are not run either until the first replay.

How: inside `graph(g)`, a TorchDispatchMode records every aten call (its function, arguments and
outputs) and a patched `InterpretedFunction.run` records every Triton launch (the kernels run under
TRITON_INTERPRET=1). Out-of-place calls still run at capture so that the region gets tensors of the
right shapes (their values are what a GPU's uninitialised graph memory would be: unused until replay).
`replay()` re-runs the record in order on the very tensors it saw: mutating calls and Triton launches
again, out-of-place calls copied into the tensors they returned at capture, views skipped (they alias
storage the other calls refresh), allocations skipped.

`emulate_cuda_graphs(monkeypatch)` swaps torch.cuda's graph, stream and pool entry points for these.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# aten calls that read device data on the host (a sync: not capturable) or bring host data in.
HOST_SYNC = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "_unique2", "unique_dim",
             "unique_consecutive", "is_nonzero", "equal", "item", "_assert_async", "lift_fresh",
             "lift_fresh_copy", "_foreach_norm"}
MASKABLE = {"index", "index_put", "index_put_", "_index_put_impl_"}  # a boolean index is a nonzero: a sync
ALLOCATIONS = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}


class CaptureError(AssertionError):
    pass


@dataclass
class Recording:
    calls: list = field(default_factory=list)  # ("aten", func, args, kwargs, out) | ("triton", fn, args, kwargs)
    triton_launches: int = 0


def _aliases_an_input(func, args, out) -> bool:
    """A view of an argument. Some calls only may alias (aten.to, reshape, contiguous return their input
    when there is nothing to do, a copy otherwise), so the storage decides, not the schema alone."""
    if not any(r.alias_info is not None for r in func._schema.returns) or not isinstance(out, torch.Tensor):
        return False
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    return any(out.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() for a in inputs)


class _Recorder(TorchDispatchMode):
    def __init__(self, rec: Recording):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in HOST_SYNC:
            raise CaptureError(f"aten.{name} inside a captured region: a host sync or host data on a GPU")
        if name in MASKABLE and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ()):
            raise CaptureError(f"aten.{name} with a boolean mask inside a captured region: a host sync on a GPU")
        schema = func._schema
        if schema.is_mutable:
            # Not run at capture (a GPU runs nothing while capturing); run at every replay.
            self.rec.calls.append(("aten", func, args, kwargs, None))
            out = kwargs.get("out", args[0])
            return out
        out = func(*args, **kwargs)
        if name not in ALLOCATIONS and not _aliases_an_input(func, args, out):
            self.rec.calls.append(("aten", func, args, kwargs, out))
        return out


_ACTIVE: list[Recording] = []


def _patch_triton(monkeypatch) -> None:
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if _ACTIVE and not warmup:
            rec = _ACTIVE[-1]
            rec.calls.append(("triton", (self, original), args, dict(kwargs, grid=grid)))
            rec.triton_launches += 1
            return None  # not launched at capture
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)


def replay(rec: Recording) -> None:
    with _disable_current_modes(), torch.inference_mode():
        for call in rec.calls:
            if call[0] == "triton":
                (fn, original), args, kwargs = call[1], call[2], call[3]
                original(fn, *args, warmup=False, **kwargs)
                continue
            _, func, args, kwargs, out = call
            fresh = func(*args, **kwargs)
            if out is None:
                continue
            outs = out if isinstance(out, (tuple, list)) else (out,)
            news = fresh if isinstance(fresh, (tuple, list)) else (fresh,)
            for o, n in zip(outs, news):
                if isinstance(o, torch.Tensor):
                    o.copy_(n)


class FakeCUDAGraph:
    def __init__(self, *args, **kwargs):
        self.recording: Recording | None = None
        self.replays = 0

    def replay(self) -> None:
        assert self.recording is not None, "replay before capture"
        replay(self.recording)
        self.replays += 1


@contextlib.contextmanager
def fake_graph(g: FakeCUDAGraph, pool=None, stream=None, **kwargs):
    rec = Recording()
    _ACTIVE.append(rec)
    try:
        with _Recorder(rec):
            yield
    finally:
        _ACTIVE.pop()
    g.recording = rec


class _FakeStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass


@contextlib.contextmanager
def _fake_stream_ctx(stream):
    yield


def emulate_cuda_graphs(monkeypatch) -> None:
    """Route torch.cuda's graph API (as the engine uses it) to the CPU emulation above."""
    _patch_triton(monkeypatch)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeCUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", _fake_stream_ctx)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _FakeStream())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())

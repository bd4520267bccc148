"""Where a decode step's time goes (`kvx bench --suite runtime --breakdown`): linear layers, attention (with
the cache append), norms and RoPE, sampling, and everything else, for a batch of 1 and a batch of 16.

The step is timed first without a profiler (its wall time per step), then run again under
torch.profiler with Python stacks: every top-level operator is charged to the innermost kvx function
that called it (models/cpu_weights.py or transformer.linear: linear; kernels/ or the step's attend:
attention; rope.py, rms_norm: norms+rope; the batch engine's token choice: sampling). "other" is the
unprofiled step time minus the four, so the parts add up to the real step: residual adds, the MLP's
activation, embedding, the step's buffers and Python between the operators.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

PARTS = ("linear", "attention", "norms+rope", "sampling")


@dataclass
class BreakdownRow:
    batch: int
    context: int
    weights: str
    step_ms: float  # wall time of one decode step, unprofiled
    parts_ms: dict  # part -> ms per step (other included)

    def to_dict(self) -> dict:
        return {"batch": self.batch, "context": self.context, "weights": self.weights,
                "step_ms": round(self.step_ms, 3), **{k: round(v, 3) for k, v in self.parts_ms.items()}}


# kvx's C kernels are ctypes calls, invisible to the profiler as operators: their Python entry points in
# kernels/cpu_native.py are charged whole (the frame's own time), and the operators inside them skipped.
_NATIVE = {"int8_linear": "linear", "layer_tail": "linear", "paged_decode_attention": "attention"}


def _native_part(name: str) -> str | None:
    """The part of a Python frame that is one of the C kernels' entry points, else None."""
    if "kernels/cpu_native.py" not in name:
        return None
    return _NATIVE.get(name.rsplit(": ", 1)[-1])


def _part(frames: list[str]) -> str | None:
    """The part an operator belongs to, from its Python callers (innermost first)."""
    for f in frames:
        if "cpu_weights.py" in f or ("transformer.py" in f and f.endswith(": linear")):
            return "linear"
        if "rope.py" in f or f.endswith(": rms_norm"):
            return "norms+rope"
        if "kvx/kernels/" in f or ("batch_step.py" in f and f.endswith(": attend")):
            return "attention"
        if "sampling.py" in f or ("batch_engine.py" in f and f.rsplit(": ", 1)[-1] in
                                  ("_decode", "_sample", "_agree_tokens")):
            return "sampling"
        if "kvx/" in f:
            return None  # the innermost kvx function is none of the four: other
    return None


def _is_python(event) -> bool:
    """A Python frame (or module call) the profiler recorded, not an operator. By the profiler's own flag:
    a name test misses frames of files without a .py suffix, such as the `kvx` console script."""
    if getattr(event, "is_python_function", False):
        return True
    name = event.name
    return name.startswith("<") or ".py(" in name or name.startswith("nn.Module:")


def charge(events) -> dict:
    """Microseconds per part over the profiled events (top-level operators only)."""
    out = dict.fromkeys(PARTS, 0.0)
    for e in events:
        if _is_python(e):
            native = _native_part(e.name)
            if native is not None:
                out[native] += e.cpu_time_total
            continue
        frames, parent, nested = [], e.cpu_parent, False
        while parent is not None:
            if not _is_python(parent) or _native_part(parent.name) is not None:
                nested = True  # inside another operator, or a C kernel's entry point: counted with it
                break
            frames.append(parent.name)
            parent = parent.cpu_parent
        if nested:
            continue
        part = _part(frames)
        if part is not None:
            out[part] += e.cpu_time_total
    return out


def _decoding_batch(engine, prompts: list[list[int]], steps: int):
    from kvx.eval.bench import _pool_for
    from kvx.runtime.engine.batch_engine import BatchEngine
    from kvx.runtime.engine.sequence import DECODE, GenerationRequest

    batch = BatchEngine(engine, pool=_pool_for(engine, prompts, steps + 4), max_batch=len(prompts),
                        prefill_step=max(len(p) for p in prompts), prefill_first=True)
    seqs = [batch.submit(GenerationRequest(prompt_ids=list(p), max_tokens=steps + 4, stop_at_eos=False))
            for p in prompts]
    while batch.scheduler.waiting or any(s.state != DECODE for s in batch.scheduler.running):
        batch.step()
    batch.step()  # warm-up
    return batch, seqs


def decode_breakdown(engine, ids: list[int], batch_size: int, steps: int = 8) -> BreakdownRow:
    """One decode step's time split for `batch_size` copies of `ids` decoding together (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    from kvx.models.cpu_weights import format_name

    batch, seqs = _decoding_batch(engine, [ids] * batch_size, 2 * steps + 2)
    t0 = time.perf_counter()
    for _ in range(steps):
        batch.step()
    step_us = (time.perf_counter() - t0) / steps * 1e6
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        for _ in range(steps):
            batch.step()
    charged = charge(prof.events())
    for s in seqs:
        batch.cancel(s)
    parts = {k: v / steps / 1e3 for k, v in charged.items()}
    parts["other"] = max(0.0, step_us / 1e3 - sum(parts.values()))
    return BreakdownRow(batch_size, len(ids), format_name(engine.model), step_us / 1e3, parts)


def breakdowns(engine, tokenizer, context: int, batches=(1, 16), steps: int = 8, progress=None) -> list[BreakdownRow]:
    from kvx.eval.bench import prose_ids

    ids = prose_ids(tokenizer, context)
    rows = []
    for b in batches:
        with torch.inference_mode():
            rows.append(decode_breakdown(engine, ids, b, steps))
        if progress:
            progress(rows[-1])
    return rows

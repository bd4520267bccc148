"""A one-token forward compiled for the CPU (`kvx generate --compile`): a lone request's decode step.

A batch-1 decode step on the CPU is ~120 small ops and 121 matrix-vector products around 30 attentions.
Eagerly each op is a dispatch and a pass over memory; the int8 products run `_weight_int8pack_mm`, which
reads the weights at about half the memory's pace (benchmarks/cpu_gemv_compile.py). Here the layer's code
is the eager forward's own (transformer.attention_inputs / attention_output_and_mlp / logits_of), traced by
`torch.compile` into three graphs — the first layer's inputs; one layer's output and MLP with the next
layer's inputs; the last layer's output and the logits — that inductor turns into fused C++ loops, the int8
products written as reductions (cpu_weights.Int8Weight.linear under compilation). The graph in the middle
is traced once and serves every layer: its weights are inputs, not constants. Attention stays the
runtime's (the `attend` callback, eager, between the graphs): it owns the cache, whose lengths change every
step.

A compiled step is not bit-identical to the eager one: its products keep float32 activations where
`_weight_int8pack_mm` rounds them to bfloat16, and inductor sums in its own order. Its logits equal the
eager forward of the same (dequantized) weights to float32 rounding (tests/test_compiled_decode.py). So it
is for a lone request only: a batch's rows (and a prefill) keep the eager kernels, which keep each row
independent of its neighbours.

Compiling costs seconds once per process (inductor caches its kernels on disk, so later runs are faster) and
needs a C++ compiler, as torch.compile on the CPU always does. Measured: 1.03-1.05x batch-1 decode tokens/s
(benchmarks/cpu_compiled_decode.py): the ~60 graph calls a step and the parallel region each small kernel
opens cost most of what the fused loops save (docs/benchmarks.md, "An int8 matrix-vector product ...").
"""

from __future__ import annotations

import torch
from torch import Tensor
import torch.nn.functional as F

from kvx.errors import KvxError
from kvx.models.rope import rope_tables
from kvx.models.transformer import attention_inputs, attention_output_and_mlp, logits_of

COMPILABLE = (None, "int8", "bfloat16")  # weight formats whose products compile (w8a8's quantized ops do not)


class CompiledDecode:
    """Callable as Transformer.forward for one token: (ids [1], positions [1], attend) -> logits [1, V]."""

    def __init__(self, model):
        cfg = model.config
        self.model = model

        def first(x, w, cos, sin):
            return attention_inputs(cfg, x, w, cos, sin)

        # The attention's output comes in flat ([H·d]): its [H, 1, d] views differ in the stride of the
        # size-1 dimension from step to step, and the graphs guard on strides (a recompile each time).
        shape = (cfg.num_heads, 1, cfg.head_dim)

        def middle(x, o, w, w_next, cos, sin):
            x = attention_output_and_mlp(cfg, x, o.view(shape), w)
            return (x, *attention_inputs(cfg, x, w_next, cos, sin))

        def last(x, o, w, final_norm, head):
            return logits_of(cfg, attention_output_and_mlp(cfg, x, o.view(shape), w), final_norm, head)

        self._first, self._middle, self._last = (torch.compile(f, dynamic=False) for f in (first, middle, last))

    def __call__(self, ids: Tensor, positions: Tensor, attend) -> Tensor:
        m = self.model
        x = F.embedding(ids, m.embed)
        cos, sin = rope_tables(positions, m.inv_freq, x.dtype)
        layers = m._layer_weights
        q, k, v, q_pre = self._first(x, layers[0], cos, sin)
        for i, w in enumerate(layers):
            o = attend(i, q, k, v, positions, q_pre).reshape(-1)
            if i + 1 == len(layers):
                return self._last(x, o, w, m.final_norm, m._head)
            x, q, k, v, q_pre = self._middle(x, o, w, layers[i + 1], cos, sin)


def compile_decode(model) -> None:
    """Give `model` a compiled one-token forward, compiled now (a dummy step), so that a missing compiler or
    an unsupported model is a KvxError here and not in the middle of an answer."""
    if model.device.type != "cpu":
        raise KvxError("--compile is for the CPU (a GPU decodes through captured CUDA graphs already)")
    if model.tp is not None:
        raise KvxError("--compile does not run over tensor-parallel ranks")
    fmt = getattr(model, "weight_format", None)
    if fmt not in COMPILABLE:
        raise KvxError(f"--compile does not support KVX_CPU_WEIGHTS={fmt}; use int8 (the default) or float32")
    compiled = CompiledDecode(model)

    def attend(layer, q, k, v, positions, q_pre):  # the shapes a real step's attention returns
        return torch.zeros_like(q)

    try:
        with torch.inference_mode():
            compiled(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), attend)
    except Exception as exc:  # noqa: BLE001 - inductor's failures (no compiler, ...) are many kinds
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KvxError(f"--compile: torch.compile could not build the decode step ({line[:200]}); "
                       "run without --compile") from None
    model.compiled_decode = compiled

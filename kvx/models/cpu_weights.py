"""Reduced weights for the CPU's linear layers: activations, norms, RoPE, the KV cache and the softmax stay
float32; only the matrices a decode step streams from memory (qkv, o, gate|up, down, the LM head) are
stored smaller, because a CPU decode step is bound by reading them (issue 36).

Formats (`KVX_CPU_WEIGHTS`, read by `options.load` when `--dtype auto` runs on the CPU):

- `int8` (the default): weight-only int8, one float scale per output row (symmetric, round to nearest).
  Up to 64 rows (every decode step: a lone sequence or a batch) run PyTorch's own `_weight_int8pack_mm`
  (the activations in bfloat16, the scale applied after the int8 dot products), whose rows are computed
  independently, bit for bit, so a sequence's step in a batch equals its step alone; more rows (a prefill)
  widen the int8 matrix to bfloat16 for that call and run a bfloat16 matmul (oneDNN) with the same scale
  after it, where the int8 kernel's cost would grow with the rows. A quarter of float32's bytes.
- `bfloat16`: the matrices rounded to bfloat16, matmuls in bfloat16 (oneDNN), results back in float32.
- `float32`: nothing changes (what `--dtype float32` runs: exact parity with transformers).

The embedding stays float32 (its rows are looked up, not streamed); a tied LM head gets its own reduced copy.
`pack(model, fmt)` swaps the model's per-layer weight tuples in place; `Transformer.forward`'s `linear`
calls a packed weight's `linear`. A packed model lives on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kvx.errors import KvxError

FORMATS = ("int8", "bfloat16", "float32")
DEFAULT = "int8"
ENV = "KVX_CPU_WEIGHTS"
_LINEAR_FIELDS = ("qkv", "o", "gate_up", "down")
_INT8_KERNEL_ROWS = 64  # up to this many rows: the int8 kernel; beyond: widened to bfloat16 (a prefill)


class Bf16Weight:
    """A [out, in] matrix held in bfloat16; x @ W.T in bfloat16, the result widened to x's dtype."""

    __slots__ = ("w",)
    fmt = "bfloat16"

    def __init__(self, w: Tensor):
        self.w = w.detach().to(torch.bfloat16).contiguous()

    @property
    def shape(self):
        return self.w.shape

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        y = F.linear(x.to(torch.bfloat16), self.w).to(x.dtype)
        return y if bias is None else y + bias

    def dequantized(self) -> Tensor:
        return self.w.float()


class Int8Weight:
    """A [out, in] matrix as int8 with one scale per output row: W ≈ q * scale[:, None]."""

    __slots__ = ("q", "scale")
    fmt = "int8"

    def __init__(self, w: Tensor):
        w = w.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)  # what _weight_int8pack_mm takes with bfloat16 activations

    @property
    def shape(self):
        return self.q.shape

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        xb = x.to(torch.bfloat16)
        if x.shape[0] <= _INT8_KERNEL_ROWS:
            # A decode step is bound by reading the weight: the int8 kernel reads a quarter of float32's
            # bytes. Its cost grows with the rows, so a prefill widens the matrix instead.
            y = torch._weight_int8pack_mm(xb, self.q, self.scale)
        else:
            y = F.linear(xb, self.q.to(torch.bfloat16)) * self.scale
        y = y.to(x.dtype)
        return y if bias is None else y + bias

    def dequantized(self) -> Tensor:
        return self.q.float() * self.scale.float()[:, None]


_CLASSES = {"int8": Int8Weight, "bfloat16": Bf16Weight}


def resolve_format(name: str | None = None) -> str:
    """The format asked for (`KVX_CPU_WEIGHTS`, else the default), checked."""
    import os

    fmt = (name if name is not None else os.environ.get(ENV, "") or DEFAULT).strip().lower()
    if fmt not in FORMATS:
        raise KvxError(f"{ENV}: unknown CPU weight format {fmt!r}; use {', '.join(FORMATS)}")
    return fmt


def pack(model, fmt: str) -> None:
    """Store `model`'s linear weights in `fmt` (in place; float32 leaves it as it is). The float32 matrices
    are released: the model keeps only the packed ones (and its float32 embedding)."""
    fmt = resolve_format(fmt)
    if fmt == "float32":
        return
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise KvxError(f"{ENV}={fmt} packs a float32 model on the CPU (this one is {model.dtype} on {model.device})")
    cls = _CLASSES[fmt]
    packed = []
    for layer, w in zip(model.layers, model._layer_weights):
        new = {f: cls(getattr(w, f)) for f in _LINEAR_FIELDS}
        packed.append(w._replace(**new))
        for f in _LINEAR_FIELDS:
            setattr(layer, f, None)  # the float32 copy goes
    model._layer_weights = packed
    model._head = cls(model.lm_head)
    if model.lm_head is not model.embed:
        model.lm_head = None
    model.weight_format = fmt


def describe(model) -> str:
    """What the summary line says about the weights: 'int8 weights', 'float32 weights', ..."""
    return f"{getattr(model, 'weight_format', None) or str(model.dtype).removeprefix('torch.')} weights"

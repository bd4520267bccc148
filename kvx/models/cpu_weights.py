"""Reduced weights for the CPU's linear layers: activations, norms, RoPE, the KV cache and the softmax stay
float32; only the matrices a decode step streams from memory (qkv, o, gate|up, down, the LM head) are
stored smaller, because a CPU decode step is bound by reading them (issue 36).

Formats (`KVX_CPU_WEIGHTS`, read by `options.load` when `--dtype auto` runs on the CPU):

- `int8` (the default): weight-only int8, one float scale per output row (symmetric, round to nearest).
  Up to 64 rows (every decode step: a lone sequence or a batch) run kvx's C kernel (kernels/cpu_native.c:
  float32 activations, the matrix stored tiled so that it is read in order, at the memory's pace; the
  neighbouring norm, SiLU and residual add fused in), or where it does not build PyTorch's own
  `_weight_int8pack_mm` (the activations in bfloat16); both compute rows independently, bit for bit, so a
  sequence's step in a batch equals its step alone. More rows (a prefill) widen the int8 matrix to
  bfloat16 for that call and run a bfloat16 matmul (oneDNN) with the same scale after it, where the int8
  kernels' cost would grow with the rows. A quarter of float32's bytes.
- `w8a8`: the same int8 weights, and each activation row quantized to int8 too (its own scale), so the
  product is an integer GEMM (fbgemm's dynamic quantized linear, VNNI on x86): it reads the weights once
  for a whole batch, where `_weight_int8pack_mm` costs about as much per row as for one (measured on the
  project's 2-core machine, every linear of the default model with cold weights: 16 rows 11.4 ms against
  45 ms, 1 row 7.4 ms against 10.5). Rows stay independent bit for bit: each row is divided by its own
  absolute maximum and the call gets one fixed anchor row (+1, -1), so fbgemm's per-tensor quantization
  parameters are the same in every call, and integer sums are exact. Activation outliers cost accuracy,
  so the weights are smoothed first (SmoothQuant, alpha 0.5: each input channel's range is moved partly
  into the weight's column, calibrated on a fixed prose passage by `calibrate`). Opt-in: it is not
  weight-only, and costs more accuracy than `int8` (docs/benchmarks.md).
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
from kvx.kernels import cpu_native

FORMATS = ("int8", "w8a8", "bfloat16", "float32")
DEFAULT = "int8"
ENV = "KVX_CPU_WEIGHTS"
LINEAR_FIELDS = ("qkv", "o", "gate_up", "down")
_ROW_PARALLEL = ("o", "down")  # split by input columns on tensor-parallel ranks (models/sharding.py)
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

    @property
    def numel(self) -> int:
        return self.w.numel()

    @property
    def nbytes(self) -> int:
        return self.w.nbytes

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        y = F.linear(x.to(torch.bfloat16), self.w).to(x.dtype)
        return y if bias is None else y + bias

    def dequantized(self) -> Tensor:
        return self.w.float()


class Int8Weight:
    """A [out, in] matrix as int8 with one scale per output row: W ≈ q * scale[:, None].

    Where kvx's C kernels load (kernels/cpu_native.py), the int8 values are held in their tiled order (the
    order the kernel reads them in: `data`), and `q`, the plain [out, in] matrix, is a copy made on demand
    (a prefill's widening, `dequantized`); otherwise `data` is `q`."""

    __slots__ = ("data", "tiled", "scale")
    fmt = "int8"

    def __init__(self, w: Tensor, row_absmax: Tensor | None = None):
        """row_absmax: each output row's largest |w| when `w` holds only part of the row (a row-parallel
        slice on a tensor-parallel rank: the whole row's maximum, so the rank's int8 values and scales are
        exactly one device's)."""
        w = w.detach().float()
        absmax = w.abs().amax(dim=1) if row_absmax is None else row_absmax.float()
        scale = absmax.clamp_min(1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        # Rounded to bfloat16 (what _weight_int8pack_mm takes), held as float32 (what the C kernel takes):
        # the same numbers on both paths.
        self.scale = scale.to(torch.bfloat16).float().contiguous()
        self.tiled = cpu_native.library() is not None
        self.data = cpu_native.tile(q) if self.tiled else q

    @property
    def q(self) -> Tensor:
        return cpu_native.untile(self.data, *self.shape) if self.tiled else self.data

    @property
    def shape(self):
        return torch.Size((self.scale.shape[0], self.data.numel() // self.scale.shape[0]))

    @property
    def numel(self) -> int:
        return self.data.numel()

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        if x.shape[0] == 1 and torch.compiler.is_compiling():
            # A one-row product inside a compiled decode step (models/compiled_decode.py): written as a
            # reduction, inductor makes it one vectorized pass over the int8 rows, widened in registers, with
            # float32 activations: exact to float32 rounding.
            y = (self.q.to(torch.float32) * x.float()).sum(-1)[None, :] * self.scale
            y = y.to(x.dtype)
            return y if bias is None else y + bias
        if x.shape[0] <= _INT8_KERNEL_ROWS:
            # A decode step is bound by reading the weight: an int8 kernel reads a quarter of float32's
            # bytes. kvx's own (kernels/cpu_native.c) reads them in order at the memory's pace with float32
            # activations; PyTorch's reads them at about half that and rounds the activations to bfloat16.
            # Both compute each row alone.
            if self.tiled and x.dtype == torch.float32:
                return cpu_native.int8_linear(cpu_native.library(), self.data, self.scale, x, bias)
            y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scale.to(torch.bfloat16))
        else:
            # A prefill: the int8 kernels' cost grows with the rows, so the matrix is widened instead.
            y = F.linear(x.to(torch.bfloat16), self.q.to(torch.bfloat16)) * self.scale
        y = y.to(x.dtype)
        return y if bias is None else y + bias

    def fused_linear(self, x: Tensor, bias: Tensor | None = None, **fused) -> Tensor | None:
        """The product with its neighbours computed in the same C call (cpu_native.int8_linear's `norm`,
        `silu_mul`, `residual`), or None where the C kernel does not run it (no library, a prefill's rows,
        another dtype, a compiled graph): the caller then runs the unfused ops."""
        if (not self.tiled or x.dtype != torch.float32 or x.shape[0] > _INT8_KERNEL_ROWS
                or torch.compiler.is_compiling()):
            return None
        return cpu_native.int8_linear(cpu_native.library(), self.data, self.scale, x, bias, **fused)

    def layer_tail(self, attn: Tensor, x: Tensor, w, eps: float, w_next) -> tuple[Tensor, Tensor | None] | None:
        """As the layer's `down` weight: the rest of layer `w` after its attention and the next layer's qkv
        product in one C call (cpu_native.layer_tail), or None where it does not run (the weights not all
        tiled int8, a prefill's rows, another dtype, a compiled graph)."""
        mats = (w.o, w.gate_up, w.down) + (() if w_next is None else (w_next.qkv,))
        if (not all(getattr(m, "tiled", False) for m in mats) or x.dtype != torch.float32
                or x.shape[0] > _INT8_KERNEL_ROWS or torch.compiler.is_compiling()):
            return None
        nxt = None if w_next is None else (w_next.attn_norm, w_next.qkv, w_next.qkv_bias)
        return cpu_native.layer_tail(cpu_native.library(), attn, x, w.o, w.o_bias, w.mlp_norm, w.gate_up, w.down,
                                     eps, nxt)

    def dequantized(self) -> Tensor:
        return self.q.float() * self.scale[:, None]


class W8A8Weight:
    """int8 weights (one scale per output row) times int8 activations (one scale per row), smoothed."""

    __slots__ = ("packed", "scale", "q", "inv_smooth", "anchor", "reduce_range")
    fmt = "w8a8"
    SMOOTHING = 0.5  # SmoothQuant's alpha: how much of an input channel's range moves into the weight

    def __init__(self, w: Tensor, act_absmax: Tensor | None = None):
        import warnings

        w = w.detach().float()
        if act_absmax is None:
            smooth = torch.ones(w.shape[1])
        else:
            a = self.SMOOTHING
            smooth = (act_absmax.float().clamp_min(1e-5) ** a / w.abs().amax(0).clamp_min(1e-5) ** (1 - a)).clamp_min(1e-5)
        self.inv_smooth = (1.0 / smooth).contiguous()
        w = w * smooth
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        self.scale = scale
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # torch.ao's quantized tensors are marked for deprecation upstream
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(self.q, scale.double(), zero, 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, None)
        # The fixed row that pins the per-tensor range to [-1, 1] whatever the batch holds (see the module).
        self.anchor = torch.zeros(1, w.shape[1])
        self.anchor[0, 0], self.anchor[0, 1 % w.shape[1]] = 1.0, -1.0
        # Without VNNI, fbgemm's u8 x s8 pairs are summed in 16 bits and can saturate: 7-bit activations there.
        self.reduce_range = not _has_vnni()

    @property
    def shape(self):
        return self.q.shape

    @property
    def numel(self) -> int:
        return self.q.numel()

    @property
    def nbytes(self) -> int:
        # fbgemm's packed copy is opaque: counted as another int8 matrix of the same size.
        return 2 * self.q.nbytes + self.scale.nbytes + self.inv_smooth.nbytes + self.anchor.nbytes

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        xs = x.float() * self.inv_smooth
        r = xs.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        y = torch.ops.quantized.linear_dynamic(torch.cat([xs / r, self.anchor]), self.packed, self.reduce_range)
        y = (y[:-1] * r).to(x.dtype)
        return y if bias is None else y + bias

    def dequantized(self) -> Tensor:
        return self.q.float() * self.scale[:, None] * self.inv_smooth[None, :]


def _has_vnni() -> bool:
    probe = getattr(torch.cpu, "_is_vnni_supported", None) or getattr(torch.cpu, "_is_avx512_vnni_supported", None)
    return bool(probe()) if probe is not None else False


class _InputRange:
    """Stands in for a linear weight during calibration: records each input channel's largest |x|."""

    __slots__ = ("w", "absmax")

    def __init__(self, w):
        self.w = w
        self.absmax = None

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        a = x.detach().abs().amax(dim=0).float()
        self.absmax = a if self.absmax is None else torch.maximum(self.absmax, a)
        return F.linear(x, self.w, bias)


def _causal_attend(layer, q, k, v, positions, q_pre):
    """Plain causal attention over the forward's own tokens (no cache): what a calibration pass needs."""
    group = q.shape[0] // k.shape[0]
    return F.scaled_dot_product_attention(q[None], k.repeat_interleave(group, 0)[None],
                                          v.repeat_interleave(group, 0)[None], is_causal=True)[0]


def calibrate(model, ids: Tensor) -> tuple[list[dict[str, Tensor]], Tensor]:
    """Each linear's per-input-channel |activation| maximum over one float32 forward of `ids` (every
    row through the LM head too): per layer {field: [in]}, and the LM head's. The model is left as it was."""
    saved_layers, saved_head = model._layer_weights, model._head
    probes = [{f: _InputRange(getattr(w, f)) for f in LINEAR_FIELDS} for w in saved_layers]
    head = _InputRange(saved_head)
    model._layer_weights = [w._replace(**p) for w, p in zip(saved_layers, probes)]
    model.__dict__["_head"] = head
    try:
        with torch.inference_mode():
            model(ids, torch.arange(len(ids)), _causal_attend)
    finally:
        model._layer_weights, model.__dict__["_head"] = saved_layers, saved_head
    return [{f: p[f].absmax for f in LINEAR_FIELDS} for p in probes], head.absmax


_CLASSES = {"int8": Int8Weight, "bfloat16": Bf16Weight}


def resolve_format(name: str | None = None) -> str:
    """The format asked for (`KVX_CPU_WEIGHTS`, else the default), checked."""
    import os

    fmt = (name if name is not None else os.environ.get(ENV, "") or DEFAULT).strip().lower()
    if fmt not in FORMATS:
        raise KvxError(f"{ENV}: unknown CPU weight format {fmt!r}; use {', '.join(FORMATS)}")
    return fmt


def pack(model, fmt: str, calibration: tuple | None = None) -> None:
    """Store `model`'s linear weights in `fmt` (in place; float32 leaves it as it is). The float32 matrices
    are released: the model keeps only the packed ones (and its float32 embedding). `calibration`: what
    `calibrate` measured, for w8a8's smoothing (without it w8a8 is not smoothed)."""
    fmt = resolve_format(fmt)
    if fmt == "float32":
        return
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise KvxError(f"{ENV}={fmt} packs a float32 model on the CPU (this one is {model.dtype} on {model.device})")
    if fmt == "w8a8" and "fbgemm" not in torch.backends.quantized.supported_engines:
        raise KvxError(f"{ENV}=w8a8 needs fbgemm (an x86 CPU); use int8")
    tp = getattr(model, "tp", None)
    if tp is not None and fmt == "w8a8":
        raise KvxError(f"{ENV}=w8a8 is not split over tensor-parallel ranks; use int8 (the default)")
    layer_ranges, head_range = calibration if calibration is not None else ([{}] * len(model.layers), None)
    if fmt == "w8a8":
        def make(w, absmax, field=None):
            return W8A8Weight(w, absmax)
    elif fmt == "int8":
        def make(w, absmax, field=None):
            if tp is not None and field in _ROW_PARALLEL:  # the rank holds a slice of each row
                return Int8Weight(w, tp.all_reduce_max(w.detach().float().abs().amax(dim=1)))
            return Int8Weight(w)
    else:
        def make(w, absmax, field=None):
            return _CLASSES[fmt](w)
    packed = []
    for layer, w, ranges in zip(model.layers, model._layer_weights, layer_ranges):
        new = {f: make(getattr(w, f), ranges.get(f), f) for f in LINEAR_FIELDS}
        packed.append(w._replace(**new))
        for f in LINEAR_FIELDS:
            setattr(layer, f, None)  # the float32 copy goes
    model._layer_weights = packed
    model._head = make(model.lm_head, head_range)
    if model.lm_head is not model.embed:
        model.lm_head = None
    model.weight_format = fmt


def describe(model) -> str:
    """What the summary line says about the weights: 'int8 weights', 'float32 weights', ..., with
    ' (C kernels)' after int8 weights that kvx's C kernels run (kernels/cpu_native.py) and
    ' (compiled decode)' under --compile."""
    fmt = format_name(model)
    notes = [n for n, on in (("C kernels", _runs_native(model)),
                             ("compiled decode", getattr(model, "compiled_decode", None) is not None)) if on]
    return f"{fmt} weights" + (f" ({', '.join(notes)})" if notes else "")


def format_name(model) -> str:
    """The linear weights' format: int8, w8a8, bfloat16, or the model's dtype (float32, ...)."""
    return getattr(model, "weight_format", None) or str(model.dtype).removeprefix("torch.")


def _runs_native(model) -> bool:
    layers = getattr(model, "_layer_weights", None)
    return bool(layers) and getattr(layers[0].qkv, "tiled", False)

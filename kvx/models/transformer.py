"""The one decoder behind every supported family (Llama, Qwen2, Qwen3, Mistral).

Family differences are config switches: qkv bias (Qwen2), per-head q/k RMSNorm (Qwen3), RoPE scaling
(Llama 3.x), sliding window (enforced by the runtime's attention, not here). Attention itself is not in
the model: each layer hands its q, k, v to the runtime's `attend`, which owns the cache and the softmax.

Weights are fused at load time (one qkv matrix, one gate|up matrix) and the per-layer tensors are kept in
plain tuples, so a decode step costs few kernel launches and little Python: this is the CPU hot path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvx.models.config import ModelConfig, load_config
from kvx.models.loader import load_state_dict, resolve_dtype
from kvx.models.rope import inv_freq_for, rope_tables, rotate

# attend(layer_idx, q [H,T,d] post-RoPE, k [Hkv,T,d] post-RoPE, v [Hkv,T,d], positions [T] int64,
#        q_pre_rope [H,T,d]) -> o [H,T,d]
AttendFn = Callable[[int, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF RMSNorm over the last dim: normalise in float32, cast back to x's dtype, then scale.

    weight is [d], or any shape that broadcasts against x (the stacked per-head q/k norm weights).
    """
    shape = x.shape[-1:]
    if x.dtype == torch.float32:
        if weight.dim() == 1:
            return F.rms_norm(x, shape, weight, eps)  # one fused kernel instead of six
        return weight * F.rms_norm(x, shape, None, eps)
    return weight * F.rms_norm(x.float(), shape, None, eps).to(x.dtype)


# On the CPU (MKL), x @ W.T for a few rows takes a slow path: with 2 to 64 rows, as in a batched decode
# step or a short question, W @ x.T is 1.4-3x faster for this model's matrices (measured on the
# project's 2-core machine, 1.1x at 128 rows, even at 1024); one row (single-sequence decode) is the
# same either way. The result is the transposed view, which every consumer below accepts.
_CPU_FEW_ROWS = 128


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) for x [T, in], weight [out, in] (or a packed CPU weight: models/cpu_weights.py)."""
    if not isinstance(weight, Tensor):
        return weight.linear(x, bias)
    if x.device.type == "cpu" and 1 < x.shape[0] <= _CPU_FEW_ROWS:
        y = (weight @ x.t()).t()
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def _fused(weight, x: Tensor, bias: Tensor | None, **fused) -> Tensor | None:
    """A packed weight's product with its neighbours in one call (cpu_weights.Int8Weight.fused_linear: kvx's
    C kernel on the CPU), or None: then the caller runs them as separate ops."""
    run = getattr(weight, "fused_linear", None)
    return None if run is None else run(x, bias, **fused)


def norm_linear(x: Tensor, norm: Tensor, eps: float, weight, bias: Tensor | None = None) -> Tensor:
    """linear(rms_norm(x, norm, eps), weight, bias)."""
    y = _fused(weight, x, bias, norm=(norm, eps))
    return y if y is not None else linear(rms_norm(x, norm, eps), weight, bias)


def linear_add(x: Tensor, weight, bias: Tensor | None, residual: Tensor) -> Tensor:
    """residual + linear(x, weight, bias)."""
    y = _fused(weight, x, bias, residual=residual)
    return y if y is not None else residual + linear(x, weight, bias)


def silu_mul_linear_add(gate_up: Tensor, weight, residual: Tensor) -> Tensor:
    """residual + linear(SiLU(gate) * up, weight), gate_up [T, 2I] holding gate then up."""
    y = _fused(weight, gate_up, None, silu_mul=True, residual=residual)
    if y is not None:
        return y
    inter = gate_up.shape[1] // 2
    return residual + linear(F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:]), weight)


class LayerWeights(NamedTuple):
    attn_norm: Tensor  # [D]
    qkv: Tensor  # [(H + 2 Hkv) d, D]
    qkv_bias: Tensor | None  # [(H + 2 Hkv) d]
    qk_norm: Tensor | None  # [H + Hkv, 1, d]: q_norm repeated over q heads, then k_norm over kv heads
    o: Tensor  # [D, H d]
    o_bias: Tensor | None  # [D]
    mlp_norm: Tensor  # [D]
    gate_up: Tensor  # [2 I, D]
    down: Tensor  # [D, I]


def _frozen(t: Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t, requires_grad=False)


class DecoderLayer(nn.Module):
    """Holds one layer's fused weights as parameters (so .to() and state_dict() work)."""

    def __init__(self, config: ModelConfig, state: dict[str, Tensor], i: int):
        super().__init__()
        p = f"model.layers.{i}."
        a = p + "self_attn."
        self.attn_norm = _frozen(state.pop(p + "input_layernorm.weight"))
        self.qkv = _frozen(torch.cat([state.pop(a + f"{n}_proj.weight") for n in "qkv"], dim=0))
        self.qkv_bias = _frozen(
            torch.cat([state.pop(a + f"{n}_proj.bias") for n in "qkv"]) if config.qkv_bias else None
        )
        if config.qk_norm:
            q_norm, k_norm = state.pop(a + "q_norm.weight"), state.pop(a + "k_norm.weight")
            stacked = torch.cat([q_norm.expand(config.num_heads, -1), k_norm.expand(config.num_kv_heads, -1)])
            self.qk_norm = _frozen(stacked[:, None, :].contiguous())
        else:
            self.qk_norm = None
        self.o = _frozen(state.pop(a + "o_proj.weight"))
        self.o_bias = _frozen(state.pop(a + "o_proj.bias") if config.o_bias else None)
        self.mlp_norm = _frozen(state.pop(p + "post_attention_layernorm.weight"))
        gate, up = state.pop(p + "mlp.gate_proj.weight"), state.pop(p + "mlp.up_proj.weight")
        self.gate_up = _frozen(torch.cat([gate, up], dim=0))
        self.down = _frozen(state.pop(p + "mlp.down_proj.weight"))

    def weights(self) -> LayerWeights:
        return LayerWeights(*(getattr(self, f) for f in LayerWeights._fields))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, state: dict[str, Tensor], tp=None, full_config: ModelConfig | None = None):
        """Build from an HF-named state dict (as load_state_dict returns).

        The dict is emptied as its tensors are fused, so the unfused copies are freed layer by layer
        instead of doubling peak memory.

        tp: a tensor-parallel rank's process group (anything with all_reduce(tensor) -> tensor), None for
        one rank; `config` is then the rank's slice (models/sharding.py) and full_config the model's.
        """
        super().__init__()
        self.config = config
        self.tp = tp
        self.full_config = full_config or config
        self.shard = None  # models/sharding.Shard on a tensor-parallel rank
        self.compiled_decode = None  # a one-token forward compiled for the CPU (models/compiled_decode.py)
        embed = state.pop("model.embed_tokens.weight")
        head = state.pop("lm_head.weight")
        self.embed = _frozen(embed)
        # Tied checkpoints share one tensor; keep it shared rather than holding the vocab matrix twice.
        self.lm_head = self.embed if head is embed else _frozen(head)
        self.final_norm = _frozen(state.pop("model.norm.weight"))
        self.layers = nn.ModuleList(DecoderLayer(config, state, i) for i in range(config.num_layers))
        # Not a buffer: model.to(bfloat16) must not round the frequencies; they stay float32.
        self._inv_freq_cpu = inv_freq_for(config.head_dim, config.rope_theta, config.rope_scaling)
        self._refresh()

    def _refresh(self) -> None:
        # Plain tuples are read in forward: attribute lookups through nn.Module cost more than the math
        # of a small layer at decode time.
        self._layer_weights = [layer.weights() for layer in self.layers]
        self.__dict__["_head"] = self.lm_head  # not a second parameter; or its packed copy (cpu_weights.pack)
        self.weight_format = None  # what cpu_weights.pack stored the linear weights as
        self.inv_freq = self._inv_freq_cpu.to(self.embed.device)

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self._refresh()
        return result

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
    ) -> "Transformer":
        config = load_config(model_dir)
        state = load_state_dict(model_dir, config, resolve_dtype(dtype), device)
        return cls(config, state)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def o_proj_weight(self, layer_idx: int) -> Tensor:
        """[hidden, H*d]; columns h*d:(h+1)*d are W_O^h."""
        o = self._layer_weights[layer_idx].o
        return o if isinstance(o, Tensor) else o.dequantized()

    def forward(self, ids: Tensor, positions: Tensor, attend: AttendFn, last_only: bool = False,
                on_residual: Callable[[int, Tensor], None] | None = None) -> Tensor:
        """ids, positions: [T] int64. Returns float32 logits [T, V], or [1, V] for the last token only.
        on_residual(layer, x): called with the residual stream [T, D] entering each layer (KVzip+ reads its
        norms), an explicit hook rather than a patched function."""
        if self.compiled_decode is not None and ids.shape[0] == 1 and on_residual is None:
            return self.compiled_decode(ids, positions, attend)  # models/compiled_decode.py (--compile)
        cfg = self.config
        x = F.embedding(ids, self.embed)
        cos, signed_sin = rope_tables(positions, self.inv_freq, x.dtype)  # [T, d], broadcast over heads
        layers, product = self._layer_weights, None
        for layer_idx, w in enumerate(layers):
            if on_residual is not None:
                on_residual(layer_idx, x)
            if product is None:
                q, k, v, q_pre = attention_inputs(cfg, x, w, cos, signed_sin)
            else:  # the previous layer's call made this layer's qkv product
                q, k, v, q_pre = qkv_heads(cfg, product, w, cos, signed_sin)
            o = attend(layer_idx, q, k, v, positions, q_pre)
            if self.tp is None:
                nxt = layers[layer_idx + 1] if layer_idx + 1 < len(layers) else None
                x, product = layer_tail_then_next(cfg, x, o, w, nxt)
            else:
                x = attention_output_and_mlp(cfg, x, o, w, self.tp)
        if last_only:
            x = x[-1:]
        return logits_of(cfg, x, self.final_norm, self._head)


def attention_inputs(cfg: ModelConfig, x: Tensor, w: LayerWeights, cos: Tensor, signed_sin: Tensor):
    """A layer up to its attention: (q [H,T,d] and k [Hkv,T,d] after RoPE, v [Hkv,T,d], q before RoPE)."""
    return qkv_heads(cfg, norm_linear(x, w.attn_norm, cfg.rms_norm_eps, w.qkv, w.qkv_bias), w, cos, signed_sin)


def qkv_heads(cfg: ModelConfig, product: Tensor, w: LayerWeights, cos: Tensor, signed_sin: Tensor):
    """attention_inputs from the layer's qkv product [T, (H + 2 Hkv) d] (its norm and bias included)."""
    H, Hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    T, n_qk = product.shape[0], H + Hkv
    # One copy into head-major layout (none at T=1); every slice below is then contiguous.
    heads = product.view(T, n_qk + Hkv, d).transpose(0, 1).contiguous()
    qk = heads[:n_qk]
    if w.qk_norm is not None:
        qk = rms_norm(qk, w.qk_norm, cfg.rms_norm_eps)
    qk_rope = rotate(qk, cos, signed_sin)  # q and k heads in one go
    return qk_rope[:H], qk_rope[H:], heads[n_qk:], qk[:H]


def attention_output_and_mlp(cfg: ModelConfig, x: Tensor, o: Tensor, w: LayerWeights, tp=None) -> Tensor:
    """The rest of a layer from its attention's output o [H,T,d]: o_proj, the residual, the MLP."""
    T = x.shape[0]
    o = o.transpose(0, 1).reshape(T, cfg.num_heads * cfg.head_dim)
    if tp is None:  # the residual adds, the norm and SiLU fused into the products where the weights allow
        x = linear_add(o, w.o, w.o_bias, x)
        return silu_mul_linear_add(norm_linear(x, w.mlp_norm, cfg.rms_norm_eps, w.gate_up), w.down, x)
    x = x + tp.all_reduce(linear(o, w.o, w.o_bias))  # row-parallel o_proj
    gate_up = linear(rms_norm(x, w.mlp_norm, cfg.rms_norm_eps), w.gate_up)
    inter = cfg.intermediate_size
    mlp_out = linear(F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:]), w.down)
    return x + tp.all_reduce(mlp_out)  # row-parallel down_proj


def layer_tail_then_next(cfg: ModelConfig, x: Tensor, o: Tensor, w: LayerWeights, w_next: LayerWeights | None):
    """attention_output_and_mlp, and the next layer's qkv product when w_next is given, in one C call where
    the weights allow (cpu_native.layer_tail: one call a layer instead of four): (x, the next layer's qkv
    product for qkv_heads, or None: then the caller runs attention_inputs)."""
    run = getattr(w.down, "layer_tail", None)
    if run is not None:
        T = x.shape[0]
        out = run(o.transpose(0, 1).reshape(T, cfg.num_heads * cfg.head_dim), x, w, cfg.rms_norm_eps, w_next)
        if out is not None:
            return out
    return attention_output_and_mlp(cfg, x, o, w), None


def logits_of(cfg: ModelConfig, x: Tensor, final_norm: Tensor, head) -> Tensor:
    """float32 logits [T, V] from the last layer's output."""
    return linear(rms_norm(x, final_norm, cfg.rms_norm_eps), head).float()

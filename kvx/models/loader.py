"""Weights from a Hugging Face folder: one model.safetensors or a sharded index, memory-mapped.

Tensors keep their HF names (model.layers.{i}.self_attn.q_proj.weight, ...); the Transformer fuses them.
Every failure a user can cause (no weights, a cut-off download, a checkpoint for another shape of model)
is reported as a one-line KvxError.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from kvx.errors import KvxError
from kvx.models.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Buffers some exporters write that carry nothing the decoder needs.
_HARMLESS_SUFFIXES = ("rotary_emb.inv_freq", ".masked_bias", ".attn.bias")

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.").lower()
    if name not in _DTYPE_NAMES:
        raise KvxError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return _DTYPE_NAMES[name]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the decoder needs, by HF name, with its shape (lm_head.weight included)."""
    D, d, I = config.hidden_size, config.head_dim, config.intermediate_size
    q_out, kv_out = config.num_heads * d, config.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, D),
        "model.norm.weight": (D,),
        "lm_head.weight": (config.vocab_size, D),
    }
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        shapes[p + "self_attn.q_proj.weight"] = (q_out, D)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, D)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, D)
        shapes[p + "self_attn.o_proj.weight"] = (D, q_out)
        if config.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_out,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_out,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_out,)
        if config.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (D,)
        if config.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (I, D)
        shapes[p + "mlp.up_proj.weight"] = (I, D)
        shapes[p + "mlp.down_proj.weight"] = (D, I)
    return shapes


def _check_safetensors_file(path: Path) -> None:
    """Raise KvxError unless the header parses and the file is exactly as long as the header says."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise KvxError(f"weights file {path} is truncated or corrupt (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise KvxError(f"weights file {path} is truncated or corrupt (header runs past the end of the file)")
            header = json.loads(f.read(header_len))
    except OSError as exc:
        raise KvxError(f"cannot read weights file {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KvxError(f"weights file {path} is corrupt (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise KvxError(f"weights file {path} is corrupt (its header is not a JSON object)")
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            n_bytes = _DTYPE_BYTES.get(info["dtype"])
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
        except (KeyError, TypeError, ValueError):
            raise KvxError(f"weights file {path} is corrupt (bad header entry for {name!r})") from None
        if n_bytes is not None and end - start != count * n_bytes:
            raise KvxError(f"weights file {path} is corrupt (tensor {name!r} has the wrong byte size)")
        data_end = max(data_end, end)
    expected = 8 + header_len + data_end
    if size < expected:
        raise KvxError(f"weights file {path} is truncated ({size} bytes, expected {expected}); re-download it")
    if size > expected:
        raise KvxError(f"weights file {path} is corrupt ({size} bytes, header describes {expected})")


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Map tensor name -> file holding it, from the index or by reading the single file's header."""
    index_path = model_dir / INDEX_FILE
    single_path = model_dir / SINGLE_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            return {str(name): model_dir / str(file) for name, file in weight_map.items()}
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise KvxError(f"shard index {index_path} is corrupt (no readable weight_map)") from None
    if single_path.is_file():
        files = [single_path]
    else:
        files = sorted(model_dir.glob("model-*.safetensors"))
    if not files:
        raise KvxError(f"no weights in {model_dir}: expected {SINGLE_FILE} or {INDEX_FILE}")
    names: dict[str, Path] = {}
    for path in files:
        _check_safetensors_file(path)
        for name in _open(path).keys():
            names[name] = path
    return names


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError:
        raise KvxError(f"weights file {path} is missing") from None
    except Exception as exc:  # safetensors raises its own error types; the message names the problem
        raise KvxError(f"weights file {path} is corrupt: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _short_list(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_state_dict(
    model_dir: str | Path,
    config: ModelConfig,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    shard=None,
) -> dict[str, Tensor]:
    """Load, check and cast every tensor the decoder needs; keys are HF names.

    With tied embeddings (or no lm_head.weight in the files) 'lm_head.weight' is the embedding tensor itself.
    shard: a tensor-parallel rank's share (models/sharding.py): its sharded tensors are read as slices,
    never whole.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise KvxError(f"model folder {model_dir} does not exist")
    dtype = resolve_dtype(dtype)
    shapes = expected_shapes(config)
    located = weight_files(model_dir)

    unexpected = sorted(
        n for n in located
        if n not in shapes and not n.endswith(_HARMLESS_SUFFIXES)
    )
    if unexpected:
        raise KvxError(
            f"checkpoint in {model_dir} has tensors a {config.architecture} with this config does not use: "
            f"{_short_list(unexpected)}"
        )
    use_embed_as_head = config.tie_word_embeddings or "lm_head.weight" not in located
    needed = [n for n in shapes if not (n == "lm_head.weight" and use_embed_as_head)]
    missing = [n for n in needed if n not in located]
    if missing:
        raise KvxError(f"checkpoint in {model_dir} lacks {len(missing)} tensors: {_short_list(missing)}")

    by_file: dict[Path, list[str]] = {}
    for name in needed:
        by_file.setdefault(located[name], []).append(name)

    state: dict[str, Tensor] = {}
    for path, names in by_file.items():
        if not path.is_file():
            raise KvxError(f"weights file {path} named in {INDEX_FILE} is missing")
        _check_safetensors_file(path)
        handle = _open(path)
        for name in names:
            try:
                tensor, shape = _read(handle, name, config, shard)
            except Exception as exc:
                raise KvxError(f"cannot read tensor {name} from {path}: {str(exc).splitlines()[0]}") from None
            if shape != shapes[name]:
                raise KvxError(
                    f"tensor {name} in {path} has shape {shape}, config implies {shapes[name]}"
                )
            state[name] = tensor.to(device=device, dtype=dtype)
    if use_embed_as_head:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def _read(handle, name: str, config: ModelConfig, shard) -> tuple[Tensor, tuple[int, ...]]:
    """(the tensor, or the shard's slice of it; the full tensor's shape)."""
    cut = None
    if shard is not None:
        from kvx.models.sharding import slice_of

        cut = slice_of(name, config, shard)
    if cut is None:
        tensor = handle.get_tensor(name)
        return tensor, tuple(tensor.shape)
    part = handle.get_slice(name)
    shape = tuple(part.get_shape())
    dim, lo, hi = cut
    if len(shape) <= dim:
        return part[:], shape  # a wrong shape: reported by the caller
    # A copy of the slice alone: the rank must not keep a view into the whole (memory-mapped) tensor.
    return (part[lo:hi] if dim == 0 else part[:, lo:hi]).clone(memory_format=torch.contiguous_format), shape

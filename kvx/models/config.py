"""What a checkpoint's config.json says about the decoder, in one dataclass for every supported family.

Llama, Qwen2, Qwen3 and Mistral differ only in switches (qkv bias, q/k norm, sliding window, RoPE
scaling), so one flat dataclass describes them all. Both the transformers 4.x layout (rope_theta +
rope_scaling, torch_dtype) and the 5.x layout (rope_parameters, dtype) are accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kvx.errors import KvxError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
)

# Configs written from a bare config object carry model_type but no "architectures" list.
_ARCHITECTURE_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}

SUPPORTED_ROPE_SCALING = ("llama3", "linear")

_DEFAULT_ROPE_THETA = {
    "LlamaForCausalLM": 10000.0,
    "Qwen2ForCausalLM": 10000.0,
    "Qwen3ForCausalLM": 10000.0,
    "MistralForCausalLM": 10000.0,
}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: dict | None
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    sliding_window: int | None
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    torch_dtype: str
    o_bias: bool = False
    # Per-layer window (None = full attention). Qwen applies its window only to some layers.
    layer_sliding_windows: list[int | None] = field(default_factory=list)
    # A tensor-parallel rank's slice (models/sharding.py) holds num_kv_heads of the model's model_kv_heads
    # (0: the whole model, one rank): a model-wide budget counts them all.
    model_kv_heads: int = 0

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def sliding_window_for(self, layer_idx: int) -> int | None:
        if self.layer_sliding_windows:
            return self.layer_sliding_windows[layer_idx]
        return self.sliding_window


def _read_json(path: Path, what: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KvxError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise KvxError(f"{what} {path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KvxError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise KvxError(f"{what} {path} nests too deeply to be a config") from None
    if not isinstance(data, dict):
        raise KvxError(f"{what} {path} does not hold a JSON object")
    return data


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _architecture(raw: dict, path: Path) -> str:
    archs = raw.get("architectures")
    if isinstance(archs, list) and archs:
        arch = str(archs[0])
    else:
        arch = _ARCHITECTURE_BY_MODEL_TYPE.get(str(raw.get("model_type", "")), "")
        if not arch:
            arch = str(raw.get("model_type") or "<none given>")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise KvxError(
            f"unsupported architecture {arch!r} in {path}; kvx supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _rope(raw: dict, arch: str, path: Path) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None). The scaling dict always carries 'rope_type'."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    theta = raw.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if scaling is None:
            scaling = params
    if theta is None:
        theta = _DEFAULT_ROPE_THETA[arch]
    if scaling is None:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise KvxError(f"rope scaling in {path} is not an object")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind not in SUPPORTED_ROPE_SCALING:
        raise KvxError(
            f"unsupported RoPE scaling {kind!r} in {path}; kvx supports {', '.join(SUPPORTED_ROPE_SCALING)}"
        )
    needed = ["factor"]
    if kind == "llama3":
        needed += ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
    missing = [k for k in needed if scaling.get(k) is None]
    if missing:
        raise KvxError(f"RoPE scaling {kind!r} in {path} lacks {', '.join(missing)}")
    out = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    out["rope_type"] = kind
    return float(theta), out


def _layer_windows(raw: dict, arch: str, num_layers: int) -> tuple[int | None, list[int | None]]:
    window = raw.get("sliding_window")
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not raw.get("use_sliding_window", False):
        window = None
    if window is None:
        return None, [None] * num_layers
    window = int(window)
    if arch == "MistralForCausalLM":
        return window, [window] * num_layers
    # Qwen: layer_types names each layer's kind; older configs give max_window_layers instead.
    types = raw.get("layer_types")
    if isinstance(types, list) and len(types) == num_layers:
        per_layer = [window if t == "sliding_attention" else None for t in types]
    else:
        first = int(raw.get("max_window_layers", 0) or 0)
        per_layer = [window if i >= first else None for i in range(num_layers)]
    return (window if any(w is not None for w in per_layer) else None), per_layer


_MAX_SIZE = 1 << 31  # no real checkpoint has a dimension, layer count or context anywhere near this


class _Fields:
    """Typed reads of config.json fields, each failure a one-line KvxError naming the field."""

    def __init__(self, raw: dict, path: Path):
        self.raw, self.path = raw, path

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.raw.get(key)
        if value is None:
            if default is None:
                raise KvxError(f"config {self.path} lacks {key!r}")
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_SIZE:
            raise KvxError(f"config {self.path}: {key} must be a whole number from 1 to {_MAX_SIZE}, got {value!r}")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise KvxError(f"config {self.path}: {key} must be a positive number, got {value!r}")
        return float(value)


def _generation_eos(model_dir: Path) -> list[int]:
    gen_path = model_dir / "generation_config.json"
    if not gen_path.is_file():
        return []
    try:
        data = json.loads(gen_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        # generation_config.json is optional metadata; a broken one must not stop the model loading.
        return []
    return _as_id_list(data.get("eos_token_id")) if isinstance(data, dict) else []


def load_config(model_dir_or_config_json: str | Path) -> ModelConfig:
    """Read config.json (given the model folder or the file itself) into a ModelConfig."""
    path = Path(model_dir_or_config_json)
    if path.is_dir():
        config_path = path / "config.json"
    elif path.exists():
        config_path = path
    else:
        raise KvxError(f"model path {path} does not exist")
    if not config_path.is_file():
        raise KvxError(f"no config.json in {path}")
    model_dir = config_path.parent
    raw = _read_json(config_path, "config")

    arch = _architecture(raw, config_path)
    fields = _Fields(raw, config_path)
    hidden = fields.integer("hidden_size")
    heads = fields.integer("num_attention_heads")
    num_layers = fields.integer("num_hidden_layers")
    vocab = fields.integer("vocab_size")
    intermediate = fields.integer("intermediate_size")
    kv_heads = fields.integer("num_key_value_heads", default=heads)
    if heads % kv_heads:
        raise KvxError(f"config {config_path}: {heads} attention heads cannot share {kv_heads} kv heads")
    head_dim = fields.integer("head_dim", default=hidden // heads)
    if head_dim < 1:
        raise KvxError(f"config {config_path}: hidden_size {hidden} is smaller than its {heads} heads")

    act = raw.get("hidden_act", raw.get("hidden_activation", "silu"))
    if act != "silu":
        raise KvxError(f"config {config_path}: activation {act!r} is not supported (only silu)")
    if raw.get("mlp_bias"):
        raise KvxError(f"config {config_path}: mlp_bias=true is not supported")

    try:
        theta, scaling = _rope(raw, arch, config_path)
        window, per_layer = _layer_windows(raw, arch, num_layers)
    except (TypeError, ValueError, OverflowError):
        raise KvxError(f"config {config_path}: the RoPE or sliding-window settings are not numbers") from None
    if window is not None and window < 1:
        raise KvxError(f"config {config_path}: sliding_window must be a positive number of tokens, got {window}")
    if not 0 < theta < float("inf") or any(not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0
                             for k, v in (scaling or {}).items() if k.endswith(("factor", "embeddings"))):
        raise KvxError(f"config {config_path}: rope_theta and the RoPE scaling factors must be positive numbers")
    attention_bias = bool(raw.get("attention_bias", False))
    qkv_bias = True if arch == "Qwen2ForCausalLM" else attention_bias
    o_bias = attention_bias if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM") else False

    eos: list[int] = []
    for tok in _as_id_list(raw.get("eos_token_id")) + _generation_eos(model_dir):
        if tok not in eos:
            eos.append(tok)
    bos = raw.get("bos_token_id")

    return ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=fields.number("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=arch == "Qwen3ForCausalLM",
        sliding_window=window,
        max_position_embeddings=fields.integer("max_position_embeddings", default=4096),
        bos_token_id=int(bos) if isinstance(bos, int) else None,
        eos_token_ids=eos,
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        o_bias=o_bias,
        layer_sliding_windows=per_layer,
    )

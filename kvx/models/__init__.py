"""What a checkpoint is: config, weights, the decoder, the tokenizer.

The names below are imported on first use (PEP 562): reading a config.json or resolving a model's
folder must not import torch, so that the command line answers a bad option or path at once.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvx.models.tokenizer import Tokenizer
    from kvx.models.transformer import Transformer

_HOMES = {
    "AttendFn": "transformer", "Transformer": "transformer",
    "ModelConfig": "config", "load_config": "config",
    "load_state_dict": "loader",
}

__all__ = sorted([*_HOMES, "load_model"])


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def load_model(model_dir: str | Path, device="cpu", dtype="float32") -> tuple["Transformer", "Tokenizer"]:
    """The decoder (weights on device, in dtype) and the tokenizer of a Hugging Face model folder."""
    from kvx.models.config import load_config
    from kvx.models.loader import load_state_dict
    from kvx.models.tokenizer import Tokenizer
    from kvx.models.transformer import Transformer

    config = load_config(model_dir)
    # The tokenizer is cheap: read it before the weights so a missing tokenizer.json fails fast.
    tokenizer = Tokenizer.from_dir(model_dir)
    model = Transformer(config, load_state_dict(model_dir, config, dtype, device))
    # What a stored compressed context (kvx compress) is checked against: cheap, headers only.
    from kvx.models.fingerprint import model_fingerprint, tokenizer_fingerprint

    model.fingerprint = model_fingerprint(model_dir)
    tokenizer.fingerprint = tokenizer_fingerprint(model_dir)
    return model, tokenizer

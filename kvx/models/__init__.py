"""What a checkpoint is: config, weights, the decoder, the tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvx.models.config import ModelConfig, load_config
from kvx.models.loader import load_state_dict
from kvx.models.transformer import AttendFn, Transformer

if TYPE_CHECKING:
    from kvx.models.tokenizer import Tokenizer

__all__ = ["AttendFn", "ModelConfig", "Transformer", "load_config", "load_model", "load_state_dict"]


def load_model(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
) -> tuple[Transformer, "Tokenizer"]:
    """The decoder (weights on device, in dtype) and the tokenizer of a Hugging Face model folder."""
    from kvx.models.tokenizer import Tokenizer  # written separately; imported here to keep import light

    config = load_config(model_dir)
    # The tokenizer is cheap: read it before the weights so a missing tokenizer.json fails fast.
    tokenizer = Tokenizer.from_dir(model_dir)
    model = Transformer(config, load_state_dict(model_dir, config, dtype, device))
    return model, tokenizer

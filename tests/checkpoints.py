"""Tiny random Hugging Face checkpoints, written by transformers itself, for tests across kvx.

    path, hf_model = make_checkpoint("qwen2", tmp_path)

Each variant exercises one family switch. Weights are re-drawn with a larger spread than HF's default
init (std 0.02 would make every layer nearly the identity and parity tests nearly vacuous), and norm
weights are randomised around 1 so that a wrong norm is visible in the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128
HIDDEN = 64
INTERMEDIATE = 96
LAYERS = 2

# name -> (config class name, config kwargs, save kwargs)
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    # GQA, untied embeddings, Llama 3.1 RoPE scaling whose three frequency bands all occur at head_dim 16
    "llama_gqa_llama3": (
        "LlamaConfig",
        dict(
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=64),
        ),
        {},
    ),
    # MHA, tied embeddings, linear RoPE scaling
    "llama_tied_mha": (
        "LlamaConfig",
        dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
             rope_scaling=dict(rope_type="linear", factor=2.0)),
        {},
    ),
    # qkv bias, GQA 4:1
    "qwen2": ("Qwen2Config", dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False), {}),
    # per-head q/k norm, head_dim 32 != hidden / heads = 16
    "qwen3": (
        "Qwen3Config",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
        {},
    ),
    # sliding window shorter than the test sequence
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8), {}),
    # the GQA Llama again, saved as many shards with an index
    "llama_sharded": (
        "LlamaConfig",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
        dict(max_shard_size="40KB"),
    ),
}


def _randomize(model: torch.nn.Module, seed: int, std: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            elif name.endswith("bias"):
                param.copy_(0.5 * noise)
            else:
                param.copy_(std * noise)


def make_checkpoint(
    variant: str, root: str | Path, seed: int = 0, std: float = 0.15, **config_overrides
) -> tuple[Path, "torch.nn.Module"]:
    """Write the variant into root/variant with safetensors; return (folder, the float32 HF model in eval mode)."""
    import transformers

    config_cls_name, config_kwargs, save_kwargs = VARIANTS[variant]
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
    )
    kwargs.update(config_kwargs)
    kwargs.update(config_overrides)
    config = getattr(transformers, config_cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    _randomize(model, seed, std)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    path = Path(root) / variant
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    return path, model


# A chat template in the style of SmolLM2's (ChatML), short enough to read.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokenizer():
    """A tokenizers backend that spells any text byte by byte: 256 byte tokens plus four special ones."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return backend


TOKENIZER_VOCAB = 260  # byte_level_tokenizer's size: a model folder's vocab_size must cover it


def make_model_folder(root: str | Path, variant: str = "llama_gqa_llama3", chat_template: str | None = CHAT_TEMPLATE,
                      **config_overrides) -> Path:
    """A complete folder `kvx generate --model` loads: a tiny checkpoint, tokenizer.json and
    tokenizer_config.json (with `chat_template`, None for none). Tokens 1 and 2 are BOS and EOS."""
    import json

    config_overrides.setdefault("vocab_size", TOKENIZER_VOCAB)
    path, _ = make_checkpoint(variant, root, **config_overrides)
    byte_level_tokenizer().save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path

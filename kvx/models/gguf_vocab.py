"""tokenizer.json and tokenizer_config.json rebuilt from a GGUF file's `tokenizer.*` metadata.

Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are supported; the pre-tokenizer is
chosen from `tokenizer.ggml.pre`, which names the splitting regex llama.cpp uses for that model family.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from kvx.errors import KvxError

# llama.cpp token types (gguf.TokenType)
_CONTROL = 3
_USER_DEFINED = 4

# The Llama-3 splitting regex (contractions, letters, 1-3 digit groups, punctuation, newlines, spaces).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in ("smollm", "starcoder", "refact"):
        # Each digit on its own, then the GPT-2 byte-level split.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in ("default", "gpt-2", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise KvxError(f"GGUF pre-tokenizer {pre!r} is not supported by kvx convert")


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """A `tokenizers` byte-level BPE tokenizer equivalent to the one llama.cpp builds from this metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise KvxError(f"GGUF tokenizer model {kind!r} is not supported by kvx convert (byte-level BPE only)")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    merges: list[str] = list(meta.get("tokenizer.ggml.merges") or [])
    if not tokens or not merges:
        raise KvxError("GGUF file lacks its tokenizer vocabulary or merges")
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))

    vocab = {token: index for index, token in enumerate(tokens)}
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise KvxError(f"GGUF tokenizer merge {merge!r} is malformed")
        pairs.append((left, right))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens are the model's special tokens; user-defined ones are added but ordinary.
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    ordinary = [AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(ordinary)

    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[int(bos_id)]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, int(bos_id))]
        )
    return tokenizer


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json: the class that loads tokenizer.json as is, special tokens, chat template."""
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])

    def token_at(key: str) -> str | None:
        index = meta.get(key)
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    config: dict[str, Any] = {
        # PreTrainedTokenizerFast takes tokenizer.json verbatim; GPT2Tokenizer would rebuild the
        # pre-tokenizer and lose the digit split.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_at("tokenizer.ggml.bos_token_id"),
        "eos_token": token_at("tokenizer.ggml.eos_token_id"),
        "unk_token": token_at("tokenizer.ggml.unknown_token_id"),
        "pad_token": token_at("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("llama.context_length", 2048)),
    }
    config = {key: value for key, value in config.items() if value is not None}
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def write_tokenizer_files(meta: dict[str, Any], folder: Path) -> None:
    build_tokenizer(meta).save(str(folder / "tokenizer.json"))
    text = json.dumps(tokenizer_config(meta), indent=2, ensure_ascii=False) + "\n"
    (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")

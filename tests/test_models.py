"""kvx.models against transformers: config reading, RoPE, loading (and its errors), logits parity."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from checkpoints import VARIANTS, make_checkpoint
from kvx.errors import KvxError
from kvx.eval.hf_cache import cache_arg, cache_of
from kvx.kernels.reference import attention
from kvx.models import Transformer, load_config, load_state_dict
from kvx.models.rope import apply_rope, inv_freq_for

PREFILL = 24
DECODE_STEPS = 6
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_checkpoint(name, root, seed=i) for i, name in enumerate(VARIANTS)}


class DenseCache:
    """The simplest cache over the reference kernel: keeps every key and value of every layer."""

    def __init__(self, model: Transformer):
        self.config = model.config
        n = model.config.num_layers
        self.k: list[torch.Tensor | None] = [None] * n
        self.v: list[torch.Tensor | None] = [None] * n
        self.pos: list[torch.Tensor | None] = [None] * n

    def attend(self, layer, q, k, v, positions, q_pre_rope):
        if self.k[layer] is None:
            self.k[layer], self.v[layer], self.pos[layer] = k, v, positions
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=1)
            self.v[layer] = torch.cat([self.v[layer], v], dim=1)
            self.pos[layer] = torch.cat([self.pos[layer], positions])
        out, _ = attention(
            q, self.k[layer], self.v[layer], positions, self.pos[layer],
            scale=self.config.head_dim**-0.5, sliding_window=self.config.sliding_window_for(layer),
        )
        return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_prefill_and_decode(checkpoints, variant):
    path, hf = checkpoints[variant]
    model = Transformer.from_pretrained(path)
    cache = DenseCache(model)
    gen = torch.Generator().manual_seed(100)
    ids = torch.randint(0, model.config.vocab_size, (PREFILL + DECODE_STEPS,), generator=gen)

    with torch.no_grad():
        ref = hf(input_ids=ids[None, :PREFILL], use_cache=True)
        got = model(ids[:PREFILL], torch.arange(PREFILL), cache.attend)
        assert got.dtype == torch.float32 and got.shape == (PREFILL, model.config.vocab_size)
        assert (got - ref.logits[0]).abs().max().item() <= TOL
        past = cache_of(ref)
        for step in range(DECODE_STEPS):
            t = PREFILL + step
            ref = hf(input_ids=ids[None, t:t + 1], **{cache_arg(hf): past}, use_cache=True)
            past = cache_of(ref)
            got = model(ids[t:t + 1], torch.tensor([t]), cache.attend)
            diff = (got - ref.logits[0]).abs().max().item()
            assert diff <= TOL, f"decode step {step}: max |dlogit| {diff}"
    # The logits spread enough that a 1e-4 match is a real test, not agreement on near-zero numbers.
    assert got.std().item() > 0.3


@pytest.mark.filterwarnings("error::FutureWarning")
def test_hf_cache_helpers_decode_like_a_full_forward(checkpoints):
    """cache_arg/cache_of hand transformers its own cache back under the name its version wants (no
    deprecation warning): a step decoded on the returned cache gives the full sequence's last logits, and
    `kvx bench`'s transformers decode loop runs on it."""
    from kvx.eval.bench import hf_decode_tps

    _, hf = checkpoints["llama_gqa_llama3"]
    ids = torch.randint(0, hf.config.vocab_size, (1, PREFILL + 1), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = hf(input_ids=ids).logits[0, -1]
        first = hf(input_ids=ids[:, :PREFILL], use_cache=True)
        past = cache_of(first)
        assert past is not None
        step = hf(input_ids=ids[:, PREFILL:], **{cache_arg(hf): past}, use_cache=True)
    assert (step.logits[0, -1] - full).abs().max().item() <= TOL
    assert cache_of(step) is not None
    assert hf_decode_tps(hf, ids[0, :PREFILL].tolist(), steps=3) > 0


@pytest.mark.parametrize("rows", [1, 2, 7, 64, 128, 129, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear_on_both_sides_of_the_few_rows_path(rows, bias):
    from kvx.models.transformer import linear

    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen)
    w = torch.randn(160, 96, generator=gen)
    b = torch.randn(160, generator=gen) if bias else None
    got = linear(x, w, b)
    ref = torch.nn.functional.linear(x, w, b)
    assert got.shape == ref.shape == (rows, 160)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)
    # Consumers reshape and slice the (possibly transposed) result: the values must not depend on its layout.
    assert torch.equal(got.reshape(rows, 10, 16).transpose(0, 1).contiguous(),
                       got.contiguous().view(rows, 10, 16).transpose(0, 1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["llama_gqa_llama3", "qwen3", "mistral"])
def test_logits_on_cuda_match_transformers_on_cpu(checkpoints, variant):
    path, hf = checkpoints[variant]
    model = Transformer.from_pretrained(path, device="cuda")
    cache = DenseCache(model)
    ids = torch.randint(0, model.config.vocab_size, (PREFILL + 2,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = hf(input_ids=ids[None]).logits[0]
    got = torch.cat([
        model(ids[:PREFILL].cuda(), torch.arange(PREFILL, device="cuda"), cache.attend),
        *(model(ids[t:t + 1].cuda(), torch.tensor([t], device="cuda"), cache.attend) for t in (PREFILL, PREFILL + 1)),
    ])
    assert got.device.type == "cuda"
    # float32 on the GPU (no TF32 by default) differs from the CPU only in summation order
    assert (got.cpu() - ref).abs().max().item() <= 5 * TOL


def test_last_only_returns_the_last_row(checkpoints):
    path, _ = checkpoints["qwen2"]
    model = Transformer.from_pretrained(path)
    ids = torch.randint(0, model.config.vocab_size, (10,), generator=torch.Generator().manual_seed(3))
    full = model(ids, torch.arange(10), DenseCache(model).attend)
    last = model(ids, torch.arange(10), DenseCache(model).attend, last_only=True)
    assert last.shape == (1, model.config.vocab_size)
    torch.testing.assert_close(last, full[-1:], rtol=0, atol=1e-5)


def test_attend_receives_documented_shapes_and_pre_rope_queries(checkpoints):
    path, hf = checkpoints["qwen3"]
    model = Transformer.from_pretrained(path)
    cfg = model.config
    seen = {}

    def attend(layer, q, k, v, positions, q_pre):
        seen[layer] = (q, k, v, positions, q_pre)
        return DenseCache(model).attend(layer, q, k, v, positions, q_pre)

    T = 7
    positions = torch.arange(5, 5 + T)
    model(torch.arange(T), positions, attend)
    assert sorted(seen) == list(range(cfg.num_layers))
    q, k, v, pos, q_pre = seen[0]
    assert q.shape == q_pre.shape == (cfg.num_heads, T, cfg.head_dim)
    assert k.shape == v.shape == (cfg.num_kv_heads, T, cfg.head_dim)
    assert torch.equal(pos, positions)
    torch.testing.assert_close(q, apply_rope(q_pre, positions, model.inv_freq), rtol=0, atol=1e-6)
    # layer 0's values are v_proj of the first norm output, computed independently through HF's module
    with torch.no_grad():
        h = hf.model.layers[0].input_layernorm(hf.model.embed_tokens(torch.arange(T)))
        v_ref = hf.model.layers[0].self_attn.v_proj(h).view(T, cfg.num_kv_heads, cfg.head_dim).transpose(0, 1)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-6)


def test_o_proj_weight_is_the_checkpoint_tensor(checkpoints):
    path, hf = checkpoints["llama_gqa_llama3"]
    model = Transformer.from_pretrained(path)
    for i in range(model.config.num_layers):
        w = model.o_proj_weight(i)
        assert w.shape == (model.config.hidden_size, model.config.num_heads * model.config.head_dim)
        assert torch.equal(w, hf.model.layers[i].self_attn.o_proj.weight)


def test_bfloat16_load_casts_weights_and_stays_close(checkpoints):
    path, _ = checkpoints["llama_gqa_llama3"]
    m32 = Transformer.from_pretrained(path)
    m16 = Transformer.from_pretrained(path, dtype="bfloat16")
    assert m16.dtype == torch.bfloat16 and m16.inv_freq.dtype == torch.float32
    ids = torch.randint(0, m32.config.vocab_size, (12,), generator=torch.Generator().manual_seed(4))
    a = m32(ids, torch.arange(12), DenseCache(m32).attend)
    b = m16(ids, torch.arange(12), DenseCache(m16).attend)
    assert b.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa; over two layers the logits drift by ~5% of their spread.
    assert (a - b).abs().max().item() < 0.15 * a.std().item()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.75
    # casting a loaded model gives the same model as loading in that dtype (fused weights are refreshed)
    m32.to(torch.bfloat16)
    assert m32.inv_freq.dtype == torch.float32
    torch.testing.assert_close(m32(ids, torch.arange(12), DenseCache(m32).attend), b, rtol=0, atol=0)


def test_tied_model_stays_tied_after_cast(checkpoints):
    model = Transformer.from_pretrained(checkpoints["llama_tied_mha"][0])
    ids = torch.randint(0, model.config.vocab_size, (8,), generator=torch.Generator().manual_seed(5))
    before = model(ids, torch.arange(8), DenseCache(model).attend)
    model.to(torch.float64)
    assert model.lm_head is model.embed and model.embed.dtype == torch.float64
    after = model(ids, torch.arange(8), DenseCache(model).attend)
    torch.testing.assert_close(after, before, rtol=0, atol=TOL)


# ---------------------------------------------------------------- config


def test_config_fields_per_family(checkpoints):
    llama = load_config(checkpoints["llama_gqa_llama3"][0])
    assert llama.architecture == "LlamaForCausalLM"
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.group_size) == (4, 2, 16, 2)
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.rope_scaling["factor"] == 8.0
    assert not llama.tie_word_embeddings and not llama.qkv_bias and not llama.qk_norm
    assert llama.sliding_window is None and llama.eos_token_ids == [2] and llama.bos_token_id == 1
    assert llama.torch_dtype == "float32" and llama.vocab_size == 128 and llama.num_layers == 2

    tied = load_config(checkpoints["llama_tied_mha"][0])
    assert tied.tie_word_embeddings and tied.group_size == 1 and tied.rope_scaling["rope_type"] == "linear"

    qwen2 = load_config(checkpoints["qwen2"][0])
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.group_size == 4 and qwen2.sliding_window is None

    qwen3 = load_config(checkpoints["qwen3"][0])
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.hidden_size == 64

    mistral = load_config(checkpoints["mistral"][0])
    assert mistral.sliding_window == 8 and mistral.sliding_window_for(1) == 8


def _write_config(tmp_path, **fields):
    raw = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 2, "vocab_size": 100, "intermediate_size": 96,
    }
    raw.update(fields)
    raw = {k: v for k, v in raw.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_config_legacy_keys_and_generation_eos(tmp_path):
    _write_config(
        tmp_path, rope_theta=500000.0, torch_dtype="bfloat16", eos_token_id=[5, 6],
        rope_scaling={"type": "linear", "factor": 4.0},
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [6, 7]}))
    cfg = load_config(tmp_path / "config.json")
    assert cfg.rope_theta == 500000.0 and cfg.torch_dtype == "bfloat16"
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert cfg.eos_token_ids == [5, 6, 7]
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 16


def test_qwen_sliding_window_only_when_enabled(tmp_path):
    _write_config(tmp_path, architectures=["Qwen2ForCausalLM"], sliding_window=32, use_sliding_window=False)
    assert load_config(tmp_path).sliding_window is None
    _write_config(tmp_path, architectures=["Qwen2ForCausalLM"], sliding_window=32, use_sliding_window=True,
                  max_window_layers=1)
    cfg = load_config(tmp_path)
    assert cfg.sliding_window == 32
    assert [cfg.sliding_window_for(i) for i in range(2)] == [None, 32]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "LlamaForCausalLM"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"hidden_size": None}, "hidden_size"),
        ({"num_key_value_heads": 3}, "kv heads"),
    ],
)
def test_config_rejects_unsupported(tmp_path, fields, message):
    _write_config(tmp_path, **fields)
    with pytest.raises(KvxError, match=message):
        load_config(tmp_path)


def test_config_missing_or_corrupt(tmp_path):
    with pytest.raises(KvxError, match="does not exist"):
        load_config(tmp_path / "nowhere")
    with pytest.raises(KvxError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(KvxError, match="not valid JSON"):
        load_config(tmp_path)


# ---------------------------------------------------------------- RoPE


def _hf_inv_freq(config) -> torch.Tensor:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # transformers 5.x keeps the scaling in `rope_parameters`, 4.x in `rope_scaling`.
    params = getattr(config, "rope_parameters", None) or config.rope_scaling
    kind = params["rope_type"]
    return ROPE_INIT_FUNCTIONS[kind](config, "cpu")[0]


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},
        {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 128},
        {"rope_type": "linear", "factor": 4.0},
    ],
)
@pytest.mark.parametrize("head_dim, theta", [(64, 500000.0), (128, 10000.0), (16, 10000.0)])
def test_inv_freq_equals_transformers(scaling, head_dim, theta):
    config = transformers.LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, rope_theta=theta, rope_scaling=dict(scaling)
    )
    ours = inv_freq_for(head_dim, theta, scaling)
    torch.testing.assert_close(ours, _hf_inv_freq(config), rtol=0, atol=0)


def test_apply_rope_matches_transformers_rotate_half():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, rope_theta=10000.0)
    rotary = LlamaRotaryEmbedding(config)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, 32, generator=gen)
    positions = torch.randint(0, 4000, (9,), generator=gen)
    cos, sin = rotary(x, positions[None])
    expected, _ = apply_rotary_pos_emb(x[None], x[None], cos, sin)
    got = apply_rope(x, positions, inv_freq_for(32, 10000.0, None))
    torch.testing.assert_close(got, expected[0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- loader


@pytest.fixture
def llama_copy(checkpoints, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(checkpoints["llama_gqa_llama3"][0], dst)
    return dst


def test_loader_tied_embeddings_share_one_tensor(checkpoints):
    path, _ = checkpoints["llama_tied_mha"]
    cfg = load_config(path)
    state = load_state_dict(path, cfg, torch.float32, "cpu")
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    model = Transformer(cfg, state)
    assert model.lm_head is model.embed


def test_loader_sharded_equals_hf_weights(checkpoints):
    path, hf = checkpoints["llama_sharded"]
    assert (path / "model.safetensors.index.json").is_file()
    state = load_state_dict(path, load_config(path), torch.float32, "cpu")
    ref = hf.state_dict()
    assert set(state) == set(ref)
    for name, tensor in state.items():
        assert torch.equal(tensor, ref[name]), name


def test_loader_missing_folder_and_weights(tmp_path, llama_copy):
    cfg = load_config(llama_copy)
    with pytest.raises(KvxError, match="does not exist"):
        load_state_dict(tmp_path / "absent", cfg)
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(KvxError, match="no weights"):
        load_state_dict(llama_copy, cfg)
    with pytest.raises(KvxError, match="no config.json"):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("keep_bytes", [4, 100, -1000, -1])
def test_loader_truncated_safetensors(llama_copy, keep_bytes):
    weights = llama_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep_bytes])
    with pytest.raises(KvxError, match="truncated|corrupt"):
        Transformer.from_pretrained(llama_copy)


def test_loader_garbage_safetensors(llama_copy):
    (llama_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"x" * 64)
    with pytest.raises(KvxError, match="corrupt"):
        Transformer.from_pretrained(llama_copy)


def test_loader_missing_and_unexpected_tensors(llama_copy):
    weights = llama_copy / "model.safetensors"
    tensors = load_file(weights)
    cfg = load_config(llama_copy)

    without = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(without, weights)
    with pytest.raises(KvxError, match="model.layers.1.mlp.up_proj.weight"):
        load_state_dict(llama_copy, cfg)

    save_file({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}, weights)
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in load_state_dict(llama_copy, cfg)

    save_file({**tensors, "model.layers.0.mystery.weight": torch.ones(8)}, weights)
    with pytest.raises(KvxError, match="mystery"):
        load_state_dict(llama_copy, cfg)

    save_file({**tensors, "model.norm.weight": torch.ones(63)}, weights)
    with pytest.raises(KvxError, match="shape"):
        load_state_dict(llama_copy, cfg)


def test_loader_missing_shard(checkpoints, tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(checkpoints["llama_sharded"][0], dst)
    sorted(dst.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(KvxError, match="missing"):
        Transformer.from_pretrained(dst)

"""`--compile` (models/compiled_decode.py): a lone request's one-token forward compiled with torch.compile.

Its int8 products keep float32 activations (cpu_weights.Int8Weight.linear under compilation), so the
reference is the eager forward of the same weights dequantized to float32: logits equal to float32 rounding
and the same greedy tokens, on every architecture's tiny checkpoint. With float32 weights the compiled step
gives the eager step's greedy tokens through the whole engine. And it is used for one token only."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from checkpoints import make_checkpoint
from kvx.errors import KvxError
from kvx.models.compiled_decode import compile_decode
from kvx.models.cpu_weights import pack
from kvx.models.transformer import Transformer
from kvx.policies import build_policy, parse_budget
from kvx.runtime.engine.batch_engine import generate
from kvx.runtime.engine.model_runner import ModelRunner
from test_engine import StubTokenizer

_FIELDS = ("qkv", "o", "gate_up", "down")

# torch.compile on the CPU builds C++ (the feature says so: `--compile` needs a C++ compiler).
pytestmark = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                reason="torch.compile on the CPU needs a C++ compiler")


def _dequantized_twin(path, packed) -> Transformer:
    """A float32 model whose linear weights are exactly `packed`'s int8 weights, dequantized."""
    twin = Transformer.from_pretrained(path)
    twin._layer_weights = [w._replace(**{f: getattr(p, f).dequantized() for f in _FIELDS})
                           for w, p in zip(twin._layer_weights, packed._layer_weights)]
    twin.__dict__["_head"] = packed._head.dequantized()
    return twin


def _dense_attend(cache: dict):
    """Causal attention over a plain per-layer list of every K/V so far (each model keeps its own)."""
    def attend(layer, q, k, v, positions, q_pre):
        ks, vs = cache.setdefault(layer, ([], []))
        ks.append(k)
        vs.append(v)
        K, V = torch.cat(ks, dim=1), torch.cat(vs, dim=1)
        return F.scaled_dot_product_attention(q[None], K[None], V[None], enable_gqa=q.shape[0] != K.shape[0])[0]
    return attend


def _greedy_steps(model, first: int, steps: int):
    cache, tok, logits_seen = {}, first, []
    attend = _dense_attend(cache)
    with torch.inference_mode():
        for pos in range(steps):
            logits = model(torch.tensor([tok]), torch.tensor([pos]), attend)[0]
            logits_seen.append(logits)
            tok = int(logits.argmax())
    return logits_seen


@pytest.mark.parametrize("arch", ["llama_gqa_llama3", "qwen2", "qwen3", "mistral"])
def test_the_compiled_int8_step_equals_the_eager_step_of_the_same_weights(arch, tmp_path):
    path, _ = make_checkpoint(arch, tmp_path)
    packed = Transformer.from_pretrained(path)
    pack(packed, "int8")
    twin = _dequantized_twin(path, packed)
    compile_decode(packed)
    got, want = _greedy_steps(packed, 5, 12), _greedy_steps(twin, 5, 12)
    assert [int(x.argmax()) for x in got] == [int(x.argmax()) for x in want]
    for a, b in zip(got, want):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, scale), (a - b).abs().max().item()


def test_the_compiled_step_runs_for_one_token_only(tmp_path):
    path, _ = make_checkpoint("qwen2", tmp_path)
    model = Transformer.from_pretrained(path)
    pack(model, "int8")
    compile_decode(model)
    calls = []
    compiled = model.compiled_decode
    model.compiled_decode = lambda *a: calls.append(1) or compiled(*a)
    attend = _dense_attend({})
    with torch.inference_mode():
        model(torch.tensor([5, 6, 7]), torch.arange(3), attend)  # a prefill: eager
        assert calls == []
        model(torch.tensor([8]), torch.tensor([3]), attend)
        assert calls == [1]


@pytest.mark.parametrize("policy,budget", [("full", None), ("snapkv", "30%"), ("tova", "40%")])
def test_compiled_float32_decode_gives_the_eager_greedy_tokens_through_the_engine(policy, budget, tmp_path):
    path, _ = make_checkpoint("llama_gqa_llama3", tmp_path, max_position_embeddings=1024)
    eager = ModelRunner(Transformer.from_pretrained(path), StubTokenizer())
    model = Transformer.from_pretrained(path)
    compile_decode(model)
    compiled = ModelRunner(model, StubTokenizer())
    ids = torch.randint(4, 120, (90,), generator=torch.Generator().manual_seed(1)).tolist()
    kw = dict(max_tokens=24, stop_at_eos=False)
    if budget is not None:
        kw.update(policy=build_policy(policy), budget=parse_budget(budget))
    assert generate(compiled, ids, **kw).token_ids == generate(eager, ids, **kw).token_ids


def test_w8a8_weights_are_refused_in_one_line(tmp_path):
    path, _ = make_checkpoint("qwen2", tmp_path)
    model = Transformer.from_pretrained(path)
    model.weight_format = "w8a8"  # what pack() records (w8a8's quantized ops do not compile)
    with pytest.raises(KvxError, match="--compile does not support KVX_CPU_WEIGHTS=w8a8"):
        compile_decode(model)

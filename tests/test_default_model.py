"""The default model (SmolLM2-135M-Instruct, converted from its GGUF) end to end against transformers."""

from __future__ import annotations

import pytest
import torch

from kvx.kernels.reference import attention
from kvx.models import load_model
from kvx.models.hub import pull_default_model
from kvx.runtime.engine.model_runner import ModelRunner
from kvx.runtime.engine.batch_engine import generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_dir():
    return pull_default_model(quiet=True)


@pytest.fixture(scope="module")
def kvx_model(default_dir):
    return load_model(default_dir)


def _dense_attend(q, k, v, positions, q_pre, scale):
    out, _ = attention(q, k, v, positions, positions, scale)
    return out


def test_logits_match_transformers_on_1k_prompt(default_dir, kvx_model):
    from transformers import AutoModelForCausalLM

    model, tok = kvx_model
    text = open(__import__("pydoc_data.topics", fromlist=["topics"]).__file__).read()[20000:60000]
    ids = tok.encode(text)[:1024]
    assert len(ids) == 1024
    scale = model.config.head_dim ** -0.5
    with torch.inference_mode():
        ours = model(torch.tensor(ids), torch.arange(len(ids)),
                     lambda i, q, k, v, p, qp: _dense_attend(q, k, v, p, qp, scale))
        hf = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32)
        theirs = hf(torch.tensor([ids])).logits[0]
    assert (ours - theirs).abs().max().item() <= 1e-3


def test_greedy_answer_mentions_paris(kvx_model):
    model, tok = kvx_model
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    result = generate(ModelRunner(model, tok), tok.encode(prompt, add_special_tokens=False), max_tokens=24)
    assert "Paris" in result.text
    assert result.finish_reason == "eos"

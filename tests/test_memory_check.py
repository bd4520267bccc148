"""The check before a prefill: a request whose cache would not fit is refused with one line saying how much
it needs, how much there is, and a --budget / --prefill-chunk that would fit, instead of running out."""

from __future__ import annotations

import json
import re

import pytest
import torch

from checkpoints import make_model_folder
from cli_checks import error_line
from kvx.errors import KvxError
from kvx.options import memory_need
from kvx.runtime.memory import Need, available_bytes, check_fits
from kvx.runtime.engine.batch_engine import generate, generate_agnostic

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 8  # about 360 byte-level tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def loaded(model_dir):
    from kvx.models import load_model

    return load_model(model_dir)


def test_check_fits_refuses_what_does_not_fit():
    need = Need(kv_bytes=10 << 20, activation_bytes=1 << 20)
    check_fits(need, torch.device("cpu"), available=11 << 20)
    with pytest.raises(KvxError) as info:
        check_fits(need, torch.device("cpu"), available=5 << 20, hint=lambda free: f"try less than {free}")
    message = str(info.value)
    assert "needs 10.00 MiB" in message and "activations 1.00 MiB" in message and "11.00 MiB in all" in message
    assert "5.00 MiB are available" in message and message.endswith(f"try less than {5 << 20}")


def test_available_memory(monkeypatch):
    monkeypatch.delenv("KVX_MEMORY_LIMIT", raising=False)
    free, phrase = available_bytes(torch.device("cpu"))
    assert free is None or free > 0
    monkeypatch.setenv("KVX_MEMORY_LIMIT", "1.5GiB")
    assert available_bytes(torch.device("cpu")) == (int(1.5 * 2**30), "KVX_MEMORY_LIMIT allows {}")
    monkeypatch.setenv("KVX_MEMORY_LIMIT", "lots")
    with pytest.raises(KvxError, match="KVX_MEMORY_LIMIT"):
        available_bytes(torch.device("cpu"))


@pytest.mark.parametrize("policy, budget, chunk, agnostic", [
    (None, None, None, False),
    ("laprox", "25%", None, False),
    ("snapkv", "40", 64, False),
    ("h2o", "30%", None, False),  # decode-time eviction: DECODE_SLACK of headroom
    (None, None, None, True),
    ("snapkv", "20%", None, True),
    ("h2o", "60%", None, True),  # each answer runs in a copy of the compressed context, beside it
])
def test_the_estimate_covers_what_the_engine_allocates(loaded, policy, budget, chunk, agnostic):
    from kvx.options import build_engine

    llm, tok = loaded
    engine = build_engine(llm, tok, policy or "full", budget, None, [], prefill_chunk=chunk)
    ids = tok.encode(LONG_PROMPT)
    question = tok.encode(" Who jumps?", add_special_tokens=False)
    if agnostic:
        need = memory_need(engine, len(ids), 24, question_tokens=len(question))
        results = generate_agnostic(engine, ids, [question], max_tokens=24)
    else:
        need = memory_need(engine, len(ids), 24)
        results = [generate(engine, ids, max_tokens=24)]
    # The check counts exactly what the engine's scheduler reserves for the request (one memory model):
    # the worst case in blocks, times the bytes a block occupies (K, V, positions, mass).
    from kvx.runtime.engine.batch_engine import BatchEngine
    from kvx.runtime.cache.pool import pool_block_bytes
    from kvx.runtime.engine.sequence import GenerationRequest

    request = (GenerationRequest(context_ids=ids, question_ids=[question], max_tokens=24, policy=engine.policy,
                                 budget=engine.budget) if agnostic else
               GenerationRequest(prompt_ids=ids, max_tokens=24, policy=engine.policy, budget=engine.budget))
    batch = BatchEngine(engine, 64 << 20)
    seq = batch.submit(request)
    assert need.kv_bytes == batch.scheduler.need(seq) * pool_block_bytes(32, engine.config.head_dim, engine.dtype)
    for result in results:
        allocated = max(result.kv_bytes_peak, result.kv_bytes_held)
        # Admission reserves the prefill's blocks and the compressed cache's (in two copies for an agnostic
        # decode-time policy) up front, so the figure may be up to ~3x the peak, never below it.
        assert allocated <= need.kv_bytes <= 3 * allocated + 4096, (need, allocated)
    assert need.activation_bytes == 0  # counted on a GPU only


def test_generate_refuses_and_suggests_what_fits(cli, model_dir, monkeypatch):
    monkeypatch.setenv("KVX_MEMORY_LIMIT", "48KiB")
    line = error_line(cli("generate", "--model", model_dir, "-n", "4", LONG_PROMPT))
    assert "not enough memory for this request" in line and "KVX_MEMORY_LIMIT allows 48.00 KiB" in line
    needs = re.search(r"its KV cache needs ([0-9.]+) KiB", line)
    assert needs and float(needs.group(1)) > 48
    suggestion = re.search(r"try --budget (\d+) --prefill-chunk (\d+)", line)
    assert suggestion, line
    code, out, err = cli("generate", "--model", model_dir, "-n", "4", "--json", "--budget", suggestion.group(1),
                         "--prefill-chunk", suggestion.group(2), LONG_PROMPT)
    assert code == 0, err
    assert json.loads(out)["kv_bytes_peak"] <= 48 * 1024


def test_question_agnostic_and_jsonl_are_checked_too(cli, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KVX_MEMORY_LIMIT", "48KiB")
    context = tmp_path / "context.txt"
    context.write_text(LONG_PROMPT)
    assert "not enough memory" in error_line(cli("generate", "--model", model_dir, "--context", context,
                                                 "-q", "Who jumps?"))
    lines = [json.dumps({"prompt": LONG_PROMPT}), json.dumps({"prompt": "Hi", "max_tokens": 2})]
    code, out, err = cli("generate", "--model", model_dir, "--jsonl", "--quiet", stdin="\n".join(lines).encode())
    rows = [json.loads(line) for line in out.splitlines()]
    # --jsonl's lines share one pool, which never claims more than the device gives (here 48 KiB): a line
    # larger than the whole pool is refused as such, the others run in it.
    assert code == 1 and "more than the whole pool (48.00 KiB)" in rows[0]["error"]
    assert rows[1]["generated_tokens"] >= 1


def test_a_jsonl_line_is_not_counted_twice(loaded, monkeypatch):
    """A --jsonl line's cache lives in the pool, whose memory the device has already given: the line is
    checked against the pool (BatchEngine.submit), and against what is free only for its activations."""
    from kvx.options import build_engine
    from kvx.pipeline import parse_line
    from kvx.runtime.engine.sampling import SamplingParams

    llm, tok = loaded
    engine = build_engine(llm, tok, "full", None, None, [])
    monkeypatch.setenv("KVX_MEMORY_LIMIT", "1KiB")  # all but nothing free: the pool took the rest
    defaults = dict(policy="full", budget=None, allocation=None, policy_args=[])
    request, _ = parse_line({"prompt": LONG_PROMPT}, engine, tok, SamplingParams(), 8, False, None, defaults)
    assert len(request.prompt_ids) > 20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_estimate_covers_the_measured_peak(model_dir):
    """On a GPU the activations count too: the estimate must cover what the prefill really allocates."""
    from kvx.models import load_model
    from kvx.options import build_engine

    llm, tok = load_model(model_dir, device="cuda", dtype=torch.bfloat16)
    ids = tok.encode(LONG_PROMPT)
    for policy, budget in ((None, None), ("snapkv", "25%")):
        engine = build_engine(llm, tok, policy or "full", budget, None, [], use_graphs=False)
        need = memory_need(engine, len(ids), 16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        generate(engine, ids, max_tokens=16)
        torch.cuda.synchronize()
        used = torch.cuda.max_memory_allocated() - base
        assert need.activation_bytes > 0 and used <= need.total, (need, used)

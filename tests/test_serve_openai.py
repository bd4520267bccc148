"""The official `openai` client against `kvx serve` on the default model: chat completions (streamed and
not), completions, the policy per request through extra_body, and greedy answers equal to `kvx generate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serve_helpers import live_server, torch_threads
from kvx.runtime.engine.batch_engine import generate

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def server():
    with torch_threads(1), live_server(None, kv_memory="256MiB", max_batch=8) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine():
    """The single-request engine `kvx generate` runs, on its own copy of the default model, with the
    weights `--dtype auto` gives it (packed on the CPU), as the server's."""
    from kvx.models.hub import pull_default_model
    from kvx.options import load
    from kvx.runtime.engine.model_runner import ModelRunner

    return ModelRunner(*load(str(pull_default_model(quiet=True)), "cpu", "auto", quiet=True))


def alone(engine, prompt: str, max_tokens: int, raw: bool = False, policy=None, budget=None):
    from kvx.options import encode_prompt
    from kvx.policies import build_policy, parse_budget
    from kvx.runtime.engine.sampling import SamplingParams

    ids = encode_prompt(engine.tokenizer, prompt, None, raw)
    pol = build_policy(policy) if policy else None
    with torch_threads(1):
        return generate(engine, ids, SamplingParams(), max_tokens, policy=pol,
                               budget=parse_budget(budget) if budget else None)


def long_prompt(engine, n_tokens: int = 400) -> str:
    from kvx.eval.haystack import filler_ids

    text = engine.tokenizer.decode(filler_ids(engine.tokenizer, n_tokens, first=False)[:n_tokens])
    return text + "\n\nIn one sentence, what is the text above about?"


def test_chat_completion_equals_kvx_generate(client):
    proc = subprocess.run([sys.executable, "-m", "kvx", "generate", "--json", "--max-tokens", "12", QUESTION],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    cli = json.loads(proc.stdout)
    resp = client.chat.completions.create(model="kvx", messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=12, temperature=0)
    assert resp.object == "chat.completion" and resp.model == "SmolLM2-135M-Instruct"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == cli["text"] and "Paris" in cli["text"]
    assert resp.choices[0].finish_reason == {"eos": "stop", "length": "length"}[cli["finish_reason"]]
    assert resp.usage.prompt_tokens == cli["prompt_tokens"]
    assert resp.usage.completion_tokens == cli["generated_tokens"]
    assert resp.usage.total_tokens == cli["prompt_tokens"] + cli["generated_tokens"]
    assert resp.usage.kv_bytes_full == cli["kv_bytes_full"] and resp.usage.kv_bytes_held >= cli["kv_bytes_allocated"]


def test_streamed_chat_is_the_same_answer_in_pieces(client, engine):
    want = alone(engine, "Write a haiku about caches.", 24)
    stream = client.chat.completions.create(model="kvx", messages=[{"role": "user", "content": "Write a haiku about caches."}],
                                            max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == want.text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length" if want.finish_reason == "length" else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.generated_tokens


def test_completions_streamed_and_not(client, engine):
    want = alone(engine, "Once upon a time", 20, raw=True)
    resp = client.completions.create(model="kvx", prompt="Once upon a time", max_tokens=20, temperature=0)
    assert resp.object == "text_completion" and resp.choices[0].text == want.text
    assert resp.usage.prompt_tokens == want.prompt_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="kvx", prompt="Once upon a time", max_tokens=20, temperature=0, stream=True) if c.choices)
    assert streamed == want.text


def test_extra_body_picks_the_policy_and_usage_shows_the_smaller_cache(client, engine):
    prompt = long_prompt(engine)
    messages = [{"role": "user", "content": prompt}]
    full = client.chat.completions.create(model="kvx", messages=messages, max_tokens=8, temperature=0)
    small = client.chat.completions.create(model="kvx", messages=messages, max_tokens=8, temperature=0,
                                           extra_body={"kv_policy": "snapkv", "kv_budget": "10%"})
    assert full.usage.prompt_tokens == small.usage.prompt_tokens > 400
    assert small.usage.kv_bytes_held < 0.3 * full.usage.kv_bytes_held
    assert small.usage.kv_bytes_held < 0.3 * small.usage.kv_bytes_full
    assert full.usage.kv_bytes_held >= full.usage.kv_bytes_full  # the full cache holds every entry
    # the compressed answer is the one `kvx generate --policy snapkv --budget 10%` gives
    assert small.choices[0].message.content == alone(engine, prompt, 8, policy="snapkv", budget="10%").text
    other = client.chat.completions.create(
        model="kvx", messages=messages, max_tokens=4, temperature=0,
        extra_body={"kv_policy": "ada-snapkv", "kv_budget": 64, "kv_policy_args": {"window": 16}})
    assert other.usage.kv_bytes_held < full.usage.kv_bytes_held


def test_sampling_fields_are_honoured(client):
    ask = [{"role": "user", "content": QUESTION}]
    answer = client.chat.completions.create(model="kvx", messages=ask, max_tokens=24, temperature=0)
    assert answer.choices[0].finish_reason == "stop" and "Paris" in answer.choices[0].message.content  # eos
    text = answer.choices[0].message.content
    # stop: the text ends before the first stop string, streamed or not
    cut = client.chat.completions.create(model="kvx", messages=ask, max_tokens=24, temperature=0, stop=["Paris"])
    assert cut.choices[0].message.content == text[:text.index("Paris")] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="kvx", messages=ask, max_tokens=24, temperature=0, stop="Paris", stream=True) if c.choices)
    assert streamed == cut.choices[0].message.content
    # max_completion_tokens (the API's current name) wins over max_tokens; ignore_eos runs past the end
    longer = client.chat.completions.create(model="kvx", messages=ask, max_tokens=3, max_completion_tokens=20,
                                            temperature=0, extra_body={"ignore_eos": True})
    assert longer.usage.completion_tokens == 20 and longer.choices[0].finish_reason == "length"
    # a seed makes sampling repeatable; temperature and top_p are applied
    sampled = [client.chat.completions.create(model="kvx", messages=ask, max_tokens=12, temperature=1.2, top_p=0.95,
                                              seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_concurrent_clients_get_their_kvx_generate_answers(server, engine):
    prompts = ["Name three primary colours.", "What is 2 + 2?", "What is a cache?"]
    wanted = [alone(engine, p, 12).text for p in prompts]

    def ask(p: str) -> str:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        return c.chat.completions.create(model="kvx", messages=[{"role": "user", "content": p}], max_tokens=12,
                                         temperature=0).choices[0].message.content

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(ask, prompts)) == wanted


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.headers["content-type"].startswith("text/plain; version=")
    m = server.wait_metrics(lambda m: m["kvx:kv_blocks_used"] == 0)
    for name in ("kvx:num_requests_running", "kvx:num_requests_waiting", "kvx:kv_blocks_used", "kvx:kv_blocks_free",
                 "kvx:kv_cache_bytes_held", "kvx:tokens_per_second", "kvx:generation_tokens_total"):
        assert name in m
    assert m["kvx:kv_blocks_free"] == m["kvx:kv_blocks_total"] and m["kvx:generation_tokens_total"] > 0
    assert "# TYPE kvx:generation_tokens_total counter" in r.text

"""32 clients at once over loopback: every request completes, none is lost, each answer equals the same
request run alone through ModelRunner.generate (what `kvx generate` runs), and the pool ends empty."""

from __future__ import annotations

import asyncio

import pytest

from serve_helpers import live_server, tiny_model_dir, torch_threads, words
from kvx.runtime.engine.batch_engine import generate

# (kv fields sent, the policy and budget they mean); the server's default is snapkv at 50%.
VARIANTS = [
    ({}, ("snapkv", "50%")),
    ({"kv_policy": "full"}, ("full", None)),
    ({"kv_policy": "h2o", "kv_budget": "40%"}, ("h2o", "40%")),
    ({"kv_policy": "streaming", "kv_budget": 12}, ("streaming", "12")),
    ({"kv_policy": "tova", "kv_budget": "50%"}, ("tova", "50%")),
    ({"kv_policy": "ahakv", "kv_budget": "40%"}, ("ahakv", "40%")),
    ({"kv_policy": "laprox", "kv_budget": "30%"}, ("laprox", "30%")),
    ({"kv_budget": "30%", "kv_allocation": "ada", "kv_policy_args": {"window": 4}}, ("snapkv", "30%")),
]
CLIENTS, MAX_TOKENS = 32, 16


def _request(i: int) -> dict:
    fields, _ = VARIANTS[i % len(VARIANTS)]
    return {"prompt": words(20 + 7 * i % 60, seed=i), "chat": i % 2 == 0, "stream": (i // 2) % 2 == 0,
            "fields": fields}


def _expected(model_dir, i: int):
    """What the request gives alone: ModelRunner.generate, greedy, with its policy."""
    from kvx.options import encode_prompt, load
    from kvx.policies import build_policy, parse_budget
    from kvx.runtime.engine.model_runner import ModelRunner
    from kvx.runtime.engine.sampling import SamplingParams

    if not hasattr(_expected, "engine"):  # the weights the server runs (`--dtype auto`: packed on the CPU)
        _expected.engine = ModelRunner(*load(str(model_dir), "cpu", "auto", quiet=True))
    engine = _expected.engine
    r = _request(i)
    name, budget = VARIANTS[i % len(VARIANTS)][1]
    ids = encode_prompt(engine.tokenizer, r["prompt"], None, raw=not r["chat"])
    if name == "full":
        return generate(engine, ids, SamplingParams(), MAX_TOKENS)
    fields = r["fields"]
    args = {k: str(v) for k, v in fields.get("kv_policy_args", {}).items()}
    policy = build_policy(name, allocation=fields.get("kv_allocation"), args=args)
    return generate(engine, ids, SamplingParams(), MAX_TOKENS, policy=policy, budget=parse_budget(budget))


async def _send(client, i: int) -> tuple[str, object]:
    r = _request(i)
    common = dict(model="tiny", max_tokens=MAX_TOKENS, temperature=0, extra_body=r["fields"], timeout=120)
    if r["chat"]:
        messages = [{"role": "user", "content": r["prompt"]}]
        if not r["stream"]:
            resp = await client.chat.completions.create(messages=messages, **common)
            return resp.choices[0].message.content, resp.usage
        stream = await client.chat.completions.create(messages=messages, stream=True,
                                                      stream_options={"include_usage": True}, **common)
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            usage = chunk.usage or usage
        return text, usage
    if not r["stream"]:
        resp = await client.completions.create(prompt=r["prompt"], **common)
        return resp.choices[0].text, resp.usage
    stream = await client.completions.create(prompt=r["prompt"], stream=True,
                                             stream_options={"include_usage": True}, **common)
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
        usage = chunk.usage or usage
    return text, usage


async def _all(url: str):
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as client:
        return await asyncio.wait_for(asyncio.gather(*(_send(client, i) for i in range(CLIENTS))), 300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def test_32_concurrent_clients_get_what_each_request_gets_alone(model_dir):
    with torch_threads(1):
        expected = [_expected(model_dir, i) for i in range(CLIENTS)]
        with live_server(str(model_dir), policy="snapkv", budget="50%", max_batch=16, kv_memory="64MiB") as srv:
            answers = asyncio.run(_all(srv.url))
            after = srv.wait_metrics(lambda m: m["kvx:kv_blocks_used"] == 0 and m["kvx:num_requests_running"] == 0)
    assert len(answers) == CLIENTS
    for i, ((text, usage), want) in enumerate(zip(answers, expected)):
        assert text == want.text, f"request {i} ({VARIANTS[i % len(VARIANTS)][1]})"
        assert usage.completion_tokens == want.generated_tokens == MAX_TOKENS
        assert usage.prompt_tokens == want.prompt_tokens
        assert usage.kv_bytes_full == want.kv_bytes_full
    assert after["kvx:kv_blocks_used"] == 0 and after["kvx:kv_blocks_reserved"] == 0
    assert after["kvx:num_requests_running"] == 0 and after["kvx:num_requests_waiting"] == 0
    assert after['kvx:request_success_total{finished_reason="length"}'] == CLIENTS
    assert after["kvx:generation_tokens_total"] == CLIENTS * MAX_TOKENS

"""64 concurrent clients over loopback, streamed and plain, a quarter of them disconnecting at random
points (before the body is read, while queued, mid-prefill, mid-stream), some sending malformed bodies:
every request that stays gets exactly one complete answer or one error body, the answers equal the same
requests sent alone afterwards (greedy), and then the pool holds nothing and the server answers /health.
Everything is bounded: 64 requests of a few tokens, one overall deadline."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from serve_helpers import live_server, tiny_model_dir, torch_threads, words

CLIENTS, MAX_TOKENS, DEADLINE_S = 64, 6, 240
LEAVER_TOKENS = 200
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MALFORMED = [b"{not json", b"[]", json.dumps({"messages": "hi"}).encode(),
             json.dumps({"prompt": "w7", "max_tokens": -1}).encode(),
             json.dumps({"messages": [{"role": "user", "content": "w7"}], "kv_policy": "nope"}).encode(),
             json.dumps({"prompt": [7, 8, 100000]}).encode(), b"", json.dumps({"prompt": "w7", "n": 3}).encode()]


def plan(i: int) -> dict:
    """Request i: 'bad' (malformed), 'leave' (disconnects after a random delay) or 'stay'."""
    rng = random.Random(i)
    kind = "bad" if i % 8 == 7 else "leave" if i % 4 == 1 else "stay"
    chat = i % 2 == 0
    body = {"max_tokens": MAX_TOKENS, "temperature": 0, "stream": (i // 2) % 2 == 0}
    text = words(4 + rng.randrange(12), seed=i)
    body.update({"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text})
    if i % 3 == 0:
        body.update({"kv_policy": "tova", "kv_budget": "50%"} if i % 6 == 0 else {"kv_policy": "full"})
    if kind == "leave":  # long enough to be surely running when its client goes (an answer of 6 can finish first)
        body["max_tokens"] = LEAVER_TOKENS
    return {"kind": kind, "path": CHAT if chat else COMPLETIONS, "body": body, "leave_after": rng.uniform(0, 0.4),
            "raw": MALFORMED[(i // 8) % len(MALFORMED)]}


def read_answer(path: str, stream: bool, status: int, raw: bytes, max_tokens: int = MAX_TOKENS) -> dict:
    """Check one response is exactly one complete answer or one error body; returns what it said."""
    text = raw.decode()
    if status != 200:
        err = json.loads(text)["error"]
        assert set(err) == {"message", "type", "param", "code"}
        return {"error": status}
    if not stream:
        obj = json.loads(text)
        assert len(obj["choices"]) == 1 and obj["choices"][0]["finish_reason"] == "length"
        assert obj["usage"]["completion_tokens"] == max_tokens
        c = obj["choices"][0]
        return {"text": c["message"]["content"] if path == CHAT else c["text"]}
    lines = [x[6:] for x in text.split("\n") if x.startswith("data: ")]
    assert lines.count("[DONE]") == 1 and lines[-1] == "[DONE]", lines[-3:]
    events = [json.loads(x) for x in lines[:-1]]
    assert not any("error" in e for e in events), events
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finishes == ["length"]
    pieces = [(e["choices"][0]["delta"].get("content") if path == CHAT else e["choices"][0]["text"]) or ""
              for e in events if e["choices"]]
    return {"text": "".join(pieces)}


async def send(client: httpx.AsyncClient, url: str, i: int) -> dict | None:
    p = plan(i)
    if p["kind"] == "bad":
        r = await client.post(url + p["path"], content=p["raw"])
        assert r.status_code == 400, (i, r.text)
        return read_answer(p["path"], False, r.status_code, r.content)

    async def whole() -> dict:
        async with client.stream("POST", url + p["path"], json=p["body"]) as r:
            raw = b"".join([chunk async for chunk in r.aiter_bytes()])
            return read_answer(p["path"], p["body"]["stream"], r.status_code, raw, p["body"]["max_tokens"])

    async def first_chunk_then_leave() -> None:
        async with client.stream("POST", url + p["path"], json=p["body"]) as r:
            async for _ in r.aiter_bytes():
                return None  # mid-stream: the answer has LEAVER_TOKENS tokens to go

    if p["kind"] == "leave" and p["body"]["stream"]:
        return await first_chunk_then_leave()
    if p["kind"] == "leave":
        try:  # the connection is dropped wherever the request is when the delay runs out
            return await asyncio.wait_for(whole(), p["leave_after"])
        except asyncio.TimeoutError:
            return None
    return await whole()


async def everyone(url: str) -> list:
    limits = httpx.Limits(max_connections=CLIENTS + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120), limits=limits) as client:
        return await asyncio.wait_for(asyncio.gather(*(send(client, url, i) for i in range(CLIENTS))), DEADLINE_S)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def test_64_clients_with_disconnects_and_malformed_bodies_lose_nothing(model_dir):
    # A small pool and batch, so that requests also wait for memory and slots.
    with torch_threads(1), live_server(str(model_dir), max_batch=8, kv_memory="1MiB", max_queue=128) as srv:
        answers = asyncio.run(everyone(srv.url))
        m = srv.wait_metrics(lambda m: m["kvx:kv_blocks_used"] == 0 and m["kvx:num_requests_running"] == 0
                             and m["kvx:num_requests_waiting"] == 0 and m["kvx:kv_blocks_reserved"] == 0)
        pool = srv.ctx.engine_loop.batch.pool
        assert pool.num_used == 0 and pool.reserved == 0
        assert m["kvx:kv_blocks_used"] == 0 and m["kvx:num_requests_waiting"] == 0
        assert httpx.get(srv.url + "/health", timeout=10).json() == {"status": "ok"}
        stays = [i for i in range(CLIENTS) if plan(i)["kind"] == "stay"]
        # the same requests alone, one at a time, on the same server
        with httpx.Client(timeout=60) as client:
            alone = {}
            for i in stays:
                p = plan(i)
                r = client.post(srv.url + p["path"], json=p["body"])
                alone[i] = read_answer(p["path"], p["body"]["stream"], r.status_code, r.content)
        after = srv.metrics()
    for i in stays:
        assert "text" in answers[i], (i, answers[i])
        assert answers[i] == alone[i], f"request {i}"
    bad = [i for i in range(CLIENTS) if plan(i)["kind"] == "bad"]
    assert all(answers[i] == {"error": 400} for i in bad)
    left = [i for i in range(CLIENTS) if plan(i)["kind"] == "leave"]
    assert len(left) == CLIENTS // 4 and len(bad) == CLIENTS // 8
    # every request the engine accepted ended once: finished or aborted, nothing else
    ended = after['kvx:request_success_total{finished_reason="length"}'] + \
        after['kvx:request_success_total{finished_reason="abort"}']
    assert len(stays) * 2 <= ended <= len(stays) * 2 + len(left)
    assert after['kvx:request_success_total{finished_reason="abort"}'] >= 1  # some did leave mid-way
    assert sum(answers[i] is None for i in left) >= 1
    assert after.get('kvx:request_errors_total{kind="server_error"}', 0) == 0

"""A client that goes away has its request cancelled and its blocks freed at once; a full queue answers
429 at once (not a hang); a stopping engine answers 503."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from serve_helpers import live_server, tiny_model_dir, torch_threads, words

CHAT = "/v1/chat/completions"
LONG = 3000  # output tokens: seconds of work on the tiny model, so the request is surely still running


def long_chat(stream: bool, seed: int = 0) -> dict:
    return {"messages": [{"role": "user", "content": words(40, seed)}], "max_tokens": LONG, "temperature": 0,
            "stream": stream}


def read_content_chunks(lines, n: int) -> list[str]:
    """Read SSE lines until n content deltas arrived (bounded by the client's read timeout).

    `lines` is one iterator kept for the whole response: dropping an httpx line iterator closes the stream."""
    got = []
    for line in lines:
        if line.startswith("data: {"):
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                got.append(delta["content"])
                if len(got) == n:
                    return got
    raise AssertionError(f"the stream ended after {len(got)} chunks")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def server(model_dir):
    with torch_threads(1), live_server(str(model_dir), max_batch=1, max_queue=1) as srv:
        yield srv


def test_client_that_disconnects_mid_stream_frees_its_blocks(server):
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server.url + CHAT, json=long_chat(stream=True)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            read_content_chunks(lines, 3)
            # /metrics is published after each engine step: wait for the step that streamed those chunks
            during = server.wait_metrics(lambda m: m["kvx:num_requests_running"] == 1)
            assert during["kvx:num_requests_running"] == 1 and during["kvx:kv_blocks_used"] > 0
        gone = time.monotonic()
    after = server.wait_metrics(lambda m: m['kvx:request_success_total{finished_reason="abort"}'] == 1, timeout=10)
    assert time.monotonic() - gone < 5
    assert after["kvx:kv_blocks_used"] == 0 and after["kvx:kv_blocks_reserved"] == 0
    assert after["kvx:num_requests_running"] == 0
    assert after["kvx:generation_tokens_total"] < LONG


def test_client_that_gives_up_on_a_non_streaming_request_frees_its_blocks(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + CHAT, json=long_chat(stream=False), timeout=httpx.Timeout(30, read=0.5))
    after = server.wait_metrics(lambda m: m['kvx:request_success_total{finished_reason="abort"}'] == 1, timeout=10)
    assert after['kvx:request_success_total{finished_reason="abort"}'] == 1
    assert after["kvx:kv_blocks_used"] == 0 and after["kvx:num_requests_running"] == 0


def test_full_queue_answers_429_at_once_and_the_server_recovers(server):
    with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
        with a.stream("POST", server.url + CHAT, json=long_chat(stream=True, seed=1)) as ra:
            a_lines = ra.iter_lines()
            read_content_chunks(a_lines, 1)  # A runs (max_batch 1) ...
            server.wait_metrics(lambda m: m["kvx:num_requests_running"] == 1 and m["kvx:num_requests_waiting"] == 0)
            with b.stream("POST", server.url + CHAT, json=long_chat(stream=True, seed=2)) as rb:
                assert rb.status_code == 200  # ... B is accepted and waits (max_queue 1) ...
                b_lines = rb.iter_lines()
                server.wait_metrics(lambda m: m["kvx:num_requests_waiting"] == 1)
                t0 = time.monotonic()
                r = httpx.post(server.url + CHAT, json=long_chat(stream=False), timeout=10)  # ... C is refused
                assert time.monotonic() - t0 < 5
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
                client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=10)
                with pytest.raises(openai.RateLimitError):
                    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w7"}])
                ra.close()  # A goes away: B starts
                read_content_chunks(b_lines, 1)
    after = server.wait_metrics(lambda m: m["kvx:kv_blocks_used"] == 0 and m["kvx:num_requests_running"] == 0)
    assert after["kvx:kv_blocks_used"] == 0 and after["kvx:queue_rejections_total"] == 2
    r = httpx.post(server.url + CHAT, json={**long_chat(stream=False), "max_tokens": 4}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_a_stopped_engine_answers_503(server):
    server.ctx.engine_loop.stop(timeout=10)
    r = httpx.post(server.url + CHAT, json={**long_chat(stream=False), "max_tokens": 4}, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 503

"""Faults inside an engine step: the requests a failure concerns get a 500 in the API's shape (or, once
streaming, one error event), their blocks and reservations go back to the pool, the other requests run on
and the next requests succeed. Failures are injected from the test: into the model's forward pass (inside
a prefill, where the engine knows which request it was working on) and around BatchEngine.step (an
exception escaping the step, which the server's engine loop handles)."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from serve_helpers import live_server, tiny_model_dir, torch_threads, words

CHAT = "/v1/chat/completions"
MARK = 127  # the token "w127": a prompt containing it fails in its prefill


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def chat(text: str, max_tokens: int, stream: bool = False) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}


def settled(server) -> dict:
    m = server.wait_metrics(lambda m: m["kvx:kv_blocks_used"] == 0 and m["kvx:kv_blocks_reserved"] == 0
                            and m["kvx:num_requests_running"] == 0 and m["kvx:num_requests_waiting"] == 0)
    pool = server.ctx.engine_loop.batch.pool
    assert pool.num_used == 0 and pool.reserved == 0, (pool.num_used, pool.reserved)
    return m


def stream_events(server, body: dict, started: threading.Event | None = None) -> list:
    """Every SSE data line of a streamed request, parsed ([DONE] kept as the string)."""
    out = []
    with httpx.stream("POST", server.url + CHAT, json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                if started is not None and sum(1 for e in out if isinstance(e, dict) and e.get("choices")
                                               and e["choices"][0]["delta"].get("content")) == 3:
                    started.set()
    return out


def content(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


def test_a_failure_inside_one_requests_prefill_fails_that_request_only(model_dir, monkeypatch):
    with torch_threads(1), live_server(str(model_dir), max_batch=4) as srv:
        alone = content(stream_events(srv, chat(words(20, 1), 40, stream=True)))
        model = srv.ctx.engine_loop.batch.engine.model
        real = model.forward

        def forward(ids, *args, **kwargs):
            if ids.numel() >= 8 and bool((ids == MARK).any()):
                raise RuntimeError("injected: the kernel crashed")
            return real(ids, *args, **kwargs)

        monkeypatch.setattr(model, "forward", forward)
        # A streams; while it decodes, B's prefill fails
        started, result = threading.Event(), {}
        a = threading.Thread(target=lambda: result.update(a=stream_events(srv, chat(words(20, 1), 40, True), started)))
        a.start()
        assert started.wait(60)
        b = httpx.post(srv.url + CHAT, json=chat(words(20, 2) + " w127", 4), timeout=60)
        a.join(60)
        assert b.status_code == 500, b.text
        assert b.json()["error"]["type"] == "server_error" and "injected" in b.json()["error"]["message"]
        events = result["a"]
        assert content(events) == alone and events[-1] == "[DONE]"  # A never noticed
        assert [e["choices"][0]["finish_reason"] for e in events if isinstance(e, dict)][-1] == "length"
        # a streamed request whose prefill fails: 200 then exactly one error event, then [DONE]
        failed = stream_events(srv, chat("w127 " + words(20, 3), 4, stream=True))
        errors = [e for e in failed if isinstance(e, dict) and "error" in e]
        assert len(errors) == 1 and errors[0]["error"]["type"] == "server_error" and failed[-1] == "[DONE]"
        assert not any(isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"] for e in failed)
        m = settled(srv)
        assert m['kvx:request_errors_total{kind="server_error"}'] == 2
        monkeypatch.setattr(model, "forward", real)
        ok = httpx.post(srv.url + CHAT, json=chat(words(20, 2) + " w127", 4), timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_an_exception_escaping_a_step_fails_the_admitted_requests_and_spares_the_waiting(model_dir, monkeypatch):
    with torch_threads(1), live_server(str(model_dir), max_batch=1) as srv:
        batch = srv.ctx.engine_loop.batch
        want_b = httpx.post(srv.url + CHAT, json=chat(words(15, 5), 6), timeout=60).json()
        real_step, state = batch.step, {"armed": False, "fired": 0}

        def step():  # the real step runs (blocks allocated, tokens made), then the failure escapes it
            done = real_step()
            if state["armed"] and batch.scheduler.waiting:
                state["armed"], state["fired"] = False, state["fired"] + 1
                raise RuntimeError("injected: escaped the step")
            return done

        monkeypatch.setattr(batch, "step", step)
        started, result = threading.Event(), {}
        a = threading.Thread(target=lambda: result.update(a=stream_events(srv, chat(words(30, 4), 400, True), started)))
        a.start()
        assert started.wait(60)
        b_result = {}
        b = threading.Thread(target=lambda: b_result.update(
            r=httpx.post(srv.url + CHAT, json=chat(words(15, 5), 6), timeout=60)))
        b.start()  # B waits behind A (max_batch 1) ...
        srv.wait_metrics(lambda m: m["kvx:num_requests_waiting"] == 1)
        assert batch.pool.num_used > 0
        state["armed"] = True  # ... when the failure escapes the step: A (admitted) fails, B (waiting) runs
        a.join(60)
        b.join(60)
        assert state["fired"] == 1
        errors = [e for e in result["a"] if isinstance(e, dict) and "error" in e]
        assert len(errors) == 1 and "escaped the step" in errors[0]["error"]["message"]
        assert result["a"][-1] == "[DONE]"
        r = b_result["r"]
        assert r.status_code == 200 and r.json()["choices"] == want_b["choices"]
        settled(srv)
        assert httpx.get(srv.url + "/health", timeout=10).json() == {"status": "ok"}
        assert httpx.post(srv.url + CHAT, json=chat(words(10, 6), 3), timeout=60).status_code == 200

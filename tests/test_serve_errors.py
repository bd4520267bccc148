"""Every bad request gets its status and an error body in the API's shape, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from serve_helpers import live_server, tiny_model_dir, torch_threads, words

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "w7 w8 w9"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A small pool: 512 KiB holds ~2000 tokens of the tiny model's K+V, so a 3000-token prompt fits the
    # context (4096) but not the pool.
    with torch_threads(1), live_server(str(tiny_model_dir(tmp_path_factory.mktemp("tiny"))),
                                       kv_memory="512KiB", max_tokens=8) as srv:
        yield srv


def chat(**fields) -> dict:
    return {"messages": HI, "max_tokens": 4, **fields}


# (path, body: dict or raw bytes, status, param, a fragment of the message, code)
BAD = [
    (CHAT, b"{not json", 400, None, "not valid JSON", "invalid_json"),
    (CHAT, b"", 400, None, "JSON object body", "invalid_json"),
    (CHAT, b"[1, 2]", 400, None, "must be a JSON object", None),
    (CHAT, b'"text"', 400, None, "must be a JSON object", None),
    (CHAT, {"max_tokens": 4}, 400, "messages", "Field required", None),
    (CHAT, {"messages": []}, 400, "messages", "at least 1", None),
    (CHAT, {"messages": "hi"}, 400, "messages", "list", None),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "", None),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content[0]",
     "text only", None),
    (CHAT, chat(max_tokens=0), 400, "max_tokens", "greater than or equal to 1", None),
    (CHAT, chat(max_tokens="many"), 400, "max_tokens", "integer", None),
    (CHAT, chat(max_completion_tokens=-1), 400, "max_completion_tokens", "", None),
    (CHAT, chat(temperature=3), 400, "temperature", "less than or equal to 2", None),
    (CHAT, chat(top_p=1.5), 400, "top_p", "", None),
    (CHAT, chat(seed="x"), 400, "seed", "", None),
    (CHAT, chat(stream="yes please"), 400, "stream", "", None),
    (CHAT, chat(n=2), 400, "n", "one choice per request", None),
    (CHAT, chat(stop=[""]), 400, "stop", "empty", None),
    (CHAT, chat(stop=7), 400, "stop", "", None),
    (CHAT, chat(logprobs=True), 400, "logprobs", "not supported", None),
    (CHAT, chat(presence_penalty=0.5), 400, "presence_penalty", "not supported", None),
    (CHAT, chat(tools=[{"type": "function"}]), 400, "tools", "not supported", None),
    (CHAT, chat(kv_policy="nope", kv_budget="5%"), 400, "kv_policy", "unknown kv_policy 'nope'", None),
    (CHAT, chat(kv_policy="snapkv"), 400, "kv_budget", "needs a kv_budget", None),
    (CHAT, chat(kv_budget="5%"), 400, "kv_budget", "default policy is full", None),
    (CHAT, chat(kv_policy="full", kv_budget="5%"), 400, "kv_budget", "keeps everything", None),
    (CHAT, chat(kv_policy="snapkv", kv_budget="lots"), 400, "kv_budget", "invalid budget", None),
    (CHAT, chat(kv_policy="snapkv", kv_budget="0%"), 400, "kv_budget", "out of range", None),
    (CHAT, chat(kv_policy="snapkv", kv_budget="150%"), 400, "kv_budget", "out of range", None),
    (CHAT, chat(kv_policy="snapkv", kv_budget=-3), 400, "kv_budget", "must be positive", None),
    (CHAT, chat(kv_policy="snapkv", kv_budget="5%", kv_allocation="diagonal"), 400, "kv_allocation",
     "unknown kv_allocation", None),
    (CHAT, chat(kv_policy="snapkv", kv_budget="5%", kv_policy_args={"colour": "blue"}), 400, "kv_policy_args",
     "unknown option 'colour'", None),
    (CHAT, chat(kv_policy="snapkv", kv_budget="5%", kv_policy_args="window"), 400, "kv_policy_args",
     "key=value", None),
    (CHAT, chat(kv_policy="snapkv", kv_budget="5%", kv_policy_args={"window": "wide"}), 400, "kv_policy_args",
     "window", None),
    (CHAT, {"messages": [{"role": "user", "content": words(5000, 1)}]}, 400, "messages",
     "the model's context is 4096 tokens", "context_length_exceeded"),
    (CHAT, {"messages": [{"role": "user", "content": words(3000, 2)}]}, 400, "messages",
     "more than the whole pool", None),
    (COMPLETIONS, {"max_tokens": 4}, 400, "prompt", "Field required", None),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt", "empty", None),
    (COMPLETIONS, {"prompt": []}, 400, "prompt", "empty", None),
    (COMPLETIONS, {"prompt": ["w7", "w8"]}, 400, "prompt", "one prompt per request", None),
    (COMPLETIONS, {"prompt": [7, 8, 100000]}, 400, "prompt", "outside the vocabulary", None),
    (COMPLETIONS, {"prompt": "w7", "echo": True}, 400, "echo", "not supported", None),
    (COMPLETIONS, {"prompt": "w7", "best_of": 3}, 400, "best_of", "not supported", None),
    (COMPLETIONS, {"prompt": " ".join(["w9"] * 4200)}, 400, "prompt", "context", "context_length_exceeded"),
]


@pytest.mark.parametrize("path, body, status, param, fragment, code", BAD,
                         ids=[f"{i}-{p.split('/')[2]}" for i, (p, *_rest) in enumerate(BAD)])
def test_bad_request_gets_its_status_and_error_body(server, path, body, status, param, fragment, code):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param and err["code"] == code
    assert fragment in err["message"]
    # ... and the server keeps serving
    ok = httpx.post(server.url + CHAT, json=chat(temperature=0), timeout=30)
    assert ok.status_code == 200, ok.text


def test_models_endpoints(server):
    assert [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=10).json()["data"]] == ["qwen2"]
    assert httpx.get(server.url + "/v1/models/qwen2", timeout=10).json()["object"] == "model"
    r = httpx.get(server.url + "/v1/models/gpt-9", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_unknown_route_and_wrong_method(server):
    r = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(server.url + CHAT, timeout=10)
    assert r.status_code == 405 and "no route GET" in r.json()["error"]["message"]


def test_unknown_fields_are_ignored_and_form_content_type_is_read_as_json(server):
    body = chat(temperature=0, frobnicate={"x": 1}, metadata={"a": "b"}, presence_penalty=0, logprobs=False)
    r = httpx.post(server.url + CHAT, json=body, timeout=30)
    assert r.status_code == 200, r.text
    # curl -d sends application/x-www-form-urlencoded; the body is still JSON
    import json

    r = httpx.post(server.url + CHAT, content=json.dumps(body),
                   headers={"content-type": "application/x-www-form-urlencoded"}, timeout=30)
    assert r.status_code == 200, r.text


def test_streaming_bad_request_is_a_plain_error_not_a_stream(server):
    r = httpx.post(server.url + CHAT, json=chat(stream=True, kv_policy="nope", kv_budget="5%"), timeout=30)
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["param"] == "kv_policy"


def test_an_engine_failure_is_a_500_and_the_server_keeps_serving(server, monkeypatch):
    batch = server.ctx.engine_loop.batch
    real_step, failed = batch.step, []

    def step_that_fails_once():  # the step runs (the request is admitted, its prompt prefilled), then fails
        done = real_step()
        if not failed:
            failed.append(True)
            raise RuntimeError("boom")
        return done

    monkeypatch.setattr(batch, "step", step_that_fails_once)
    r = httpx.post(server.url + CHAT, json=chat(temperature=0), timeout=30)
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "server_error" and "boom" in r.json()["error"]["message"]
    assert httpx.post(server.url + CHAT, json=chat(temperature=0), timeout=30).status_code == 200
    m = server.wait_metrics(lambda m: m["kvx:kv_blocks_used"] == 0 and m["kvx:num_requests_running"] == 0)
    assert m["kvx:kv_blocks_reserved"] == 0 and m['kvx:request_errors_total{kind="server_error"}'] == 1


def test_after_every_error_nothing_is_held(server):
    m = server.wait_metrics(lambda m: m["kvx:kv_blocks_used"] == 0 and m["kvx:num_requests_running"] == 0)
    assert m["kvx:kv_blocks_used"] == 0 and m["kvx:kv_blocks_reserved"] == 0 and m["kvx:num_requests_waiting"] == 0
    assert m['kvx:request_errors_total{kind="invalid_request"}'] >= 1  # e.g. the request larger than the pool
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}

"""POST /tokenize and /detokenize in vLLM's shapes (the count a prompt gets is the usage it is billed),
and usage.prompt_tokens_details.cached_tokens (0: nothing is served from a stored cache yet)."""

from __future__ import annotations

import httpx
import openai
import pytest

from serve_helpers import live_server, tiny_model_dir, torch_threads, words


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with torch_threads(1), live_server(str(tiny_model_dir(tmp_path_factory.mktemp("tiny"))), max_tokens=2) as srv:
        yield srv


def post(server, path: str, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30)


def test_tokenize_counts_what_the_completion_routes_bill(server):
    text = words(12, seed=1)
    tok = post(server, "/tokenize", {"prompt": text, "model": "qwen2"}).json()
    assert set(tok) == {"count", "max_model_len", "tokens", "token_strs"}
    assert tok["max_model_len"] == 4096 and tok["count"] == len(tok["tokens"]) and tok["token_strs"] is None
    done = post(server, "/v1/completions", {"prompt": text, "max_tokens": 1}).json()
    assert done["usage"]["prompt_tokens"] == tok["count"]
    # the same ids sent as a token prompt give the same answer
    again = post(server, "/v1/completions", {"prompt": tok["tokens"], "max_tokens": 1, "temperature": 0}).json()
    first = post(server, "/v1/completions", {"prompt": text, "max_tokens": 1, "temperature": 0}).json()
    assert again["choices"][0]["text"] == first["choices"][0]["text"]

    messages = [{"role": "system", "content": "w9"}, {"role": "user", "content": text}]
    chat_tok = post(server, "/tokenize", {"messages": messages, "return_token_strs": True}).json()
    chat = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == chat_tok["count"] > tok["count"]
    assert len(chat_tok["token_strs"]) == chat_tok["count"] and "w9" in chat_tok["token_strs"]

    plain = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert plain["count"] <= tok["count"]


def test_detokenize_inverts_tokenize(server):
    text = words(8, seed=2)
    ids = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert post(server, "/detokenize", {"tokens": ids}).json() == {"prompt": text}
    assert post(server, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {}, "messages"),
    ("/tokenize", {"prompt": "w7", "messages": [{"role": "user", "content": "w7"}]}, "prompt"),
    ("/tokenize", {"prompt": 7}, "prompt"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": "w7"}], "add_generation_prompt": False},
     "add_generation_prompt"),
    ("/detokenize", {"tokens": [7, 100000]}, "tokens"),
    ("/detokenize", {"tokens": ["w7"]}, "tokens[0]"),
    ("/detokenize", {}, "tokens"),
])
def test_bad_bodies_are_400s_in_the_api_shape(server, path, body, param):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_usage_reports_zero_cached_tokens(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)
    resp = client.chat.completions.create(model="qwen2", messages=[{"role": "user", "content": "w7 w8"}])
    assert resp.usage.prompt_tokens_details.cached_tokens == 0
    chunks = list(client.completions.create(model="qwen2", prompt="w7 w8", stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0

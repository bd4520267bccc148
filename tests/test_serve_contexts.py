"""Stored contexts in the server: POST /v1/contexts compresses once, requests name it with kv_context, share
its blocks, and get the answers they get one by one; DELETE lets running requests finish; a restart with
--context-dir answers from the saved context; with keys, a context is its maker's. A real uvicorn on
127.0.0.1, the official openai client, a tiny model; every loop bounded."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_helpers import live_server, tiny_model_dir, torch_threads, words

QUESTIONS = [words(n, 100 + n) for n in range(3, 19)]  # 16 questions of 3..18 words


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with torch_threads(1), live_server(str(model_dir), dtype="float32", kv_memory="8MiB", max_batch=16,
                                       context_dir=str(tmp_path_factory.mktemp("ctxdir"))) as srv:
        yield srv


def _client(srv, key="none"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=120)


def _create(srv, text, key=None, **extra):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(srv.url + "/v1/contexts", json={"text": text, **extra}, headers=headers, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _ask(client, cid, question, max_tokens=8):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                       max_tokens=max_tokens, temperature=0, extra_body={"kv_context": cid})
    return r.choices[0].message.content, r.usage


def _idle(srv, timeout=30.0):
    """Wait (bounded) until the engine has nothing running or waiting."""
    batch = srv.ctx.engine_loop.batch
    deadline = time.monotonic() + timeout
    while batch.has_work and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not batch.has_work


def test_sixteen_concurrent_questions_share_one_context(server):
    made = _create(server, words(3800, 1), kv_policy="snapkv", kv_budget="20%", name="doc")
    cid = made["id"]
    assert cid.startswith("ctx-") and len(cid) == 36 and made["context_tokens"] > 3800
    assert made["entries_kept"] <= 0.21 * made["entries_full"] and made["bytes_held"] < made["bytes_full"] / 3
    assert made["file_bytes"] and made["policy"] == "snapkv" and made["budget"] == "20%"
    client = _client(server)
    one_by_one = [_ask(client, cid, q) for q in QUESTIONS]
    for _, usage in one_by_one:
        assert usage.prompt_tokens_details.cached_tokens == made["context_tokens"]
    _idle(server)

    batch = server.ctx.engine_loop.batch
    pool = batch.pool
    entry = server.ctx.contexts.entries[cid]
    ctx_blocks = entry.ctx.blocks(pool.block_size)
    peak = {"used": 0, "users": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak["used"] = max(peak["used"], pool.num_used)
            peak["users"] = max(peak["users"], entry.ctx.users)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(16) as ex:
        together = list(ex.map(lambda q: _ask(client, cid, q), QUESTIONS))
    stop.set()
    watcher.join(5)
    assert [a for a, _ in together] == [a for a, _ in one_by_one]
    # The context's blocks are held once: 16 requests on it hold only their own few blocks each (a private
    # copy per request would be 16 x ctx_blocks).
    # (each question: its words, the chat turn's end and the assistant header, then 8 output tokens)
    own_most = max(entry.ctx.request_blocks(pool.block_size, len(q.split()) + 4 + 8) for q in QUESTIONS)
    assert peak["users"] >= 2
    assert ctx_blocks <= peak["used"] <= ctx_blocks + 16 * own_most < 3 * ctx_blocks
    _idle(server)
    assert pool.num_used == ctx_blocks  # only the idle, resident context
    m = server.metrics()
    assert m["kvx:contexts"] >= 1 and m['kvx:context_bytes{tier="pool"}'] == ctx_blocks * pool.block_bytes
    assert m["kvx:context_hits_total"] >= 32 and m["kvx:context_loads_total"] >= 1
    listed = httpx.get(server.url + "/v1/contexts", timeout=10).json()["data"]
    assert cid in [c["id"] for c in listed]


def test_delete_while_requests_run_lets_them_finish_then_frees_the_blocks(server):
    cid = _create(server, words(800, 2), kv_policy="snapkv", kv_budget="25%")["id"]
    client = _client(server)
    streams = [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                              max_tokens=40, temperature=0, stream=True,
                                              extra_body={"kv_context": cid}) for q in QUESTIONS[:4]]
    firsts = [next(iter(s)) for s in streams]  # every request is admitted and streaming
    assert all(f.choices for f in firsts)
    r = httpx.delete(f"{server.url}/v1/contexts/{cid}", timeout=30)
    assert r.status_code == 200 and r.json()["deleted"]
    assert httpx.get(f"{server.url}/v1/contexts/{cid}", timeout=10).status_code == 404
    with pytest.raises(openai.NotFoundError):
        _ask(client, cid, QUESTIONS[0])
    finishes = []
    for s in streams:
        chunks = list(s)
        finishes.append(chunks[-1].choices[0].finish_reason)
    assert finishes == ["length"] * 4
    _idle(server)
    entry_ids = server.ctx.contexts.entries
    assert cid not in entry_ids
    held = sum(e.ctx.reserved for e in entry_ids.values())
    pool = server.ctx.engine_loop.batch.pool
    assert pool.num_used == held and pool.reserved == held  # every block of the deleted context is back


def test_bad_requests_on_contexts(server):
    cid = _create(server, words(300, 3), kv_policy="snapkv", kv_budget="30%")["id"]
    client = _client(server)
    with pytest.raises(openai.BadRequestError, match="kv_budget"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w7"}], max_tokens=2,
                                       extra_body={"kv_context": cid, "kv_budget": "5%"})
    with pytest.raises(openai.BadRequestError, match="one user message"):
        client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "w8"},
                                                              {"role": "user", "content": "w7"}],
                                       max_tokens=2, extra_body={"kv_context": cid})
    with pytest.raises(openai.NotFoundError):
        _ask(client, "ctx-" + "0" * 32, "w7")
    r = httpx.post(server.url + "/v1/contexts", json={"text": "   "}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "text"
    r = httpx.post(server.url + "/v1/contexts", json={"text": "w9", "kv_policy": "nosuch"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "kv_policy"
    # A completion continues the context with raw text, and counts its tokens as cached.
    done = client.completions.create(model="tiny", prompt="w10 w11", max_tokens=3, temperature=0,
                                     extra_body={"kv_context": cid})
    assert done.usage.prompt_tokens_details.cached_tokens > 300 and done.usage.completion_tokens == 3


def test_a_restart_with_the_context_dir_answers_from_the_saved_context(model_dir, tmp_path):
    folder = tmp_path / "contexts"
    with torch_threads(1), live_server(str(model_dir), dtype="float32", kv_memory="8MiB", context_dir=str(folder)) as srv:
        cid = _create(srv, words(900, 4), kv_policy="kvzip", kv_budget="20%")["id"]
        before = _ask(_client(srv), cid, QUESTIONS[5])[0]
    assert (folder / f"{cid}.kvc").is_file()
    with torch_threads(1), live_server(str(model_dir), dtype="float32", kv_memory="8MiB", context_dir=str(folder)) as srv:
        listed = httpx.get(srv.url + "/v1/contexts", timeout=10).json()["data"]
        assert [c["id"] for c in listed] == [cid] and not listed[0]["resident"]
        after = _ask(_client(srv), cid, QUESTIONS[5])[0]
    assert after == before


def test_a_context_belongs_to_the_key_that_made_it(model_dir):
    with torch_threads(1), live_server(str(model_dir), dtype="float32", kv_memory="8MiB", api_keys=["alice-key", "bob-key"]) as srv:
        cid = _create(srv, words(300, 5), key="alice-key", kv_policy="snapkv", kv_budget="30%")["id"]
        assert _ask(_client(srv, "alice-key"), cid, "w7 w8")[0] is not None
        with pytest.raises(openai.NotFoundError):
            _ask(_client(srv, "bob-key"), cid, "w7 w8")
        bob = {"Authorization": "Bearer bob-key"}
        assert httpx.get(f"{srv.url}/v1/contexts/{cid}", headers=bob, timeout=10).status_code == 404
        assert httpx.delete(f"{srv.url}/v1/contexts/{cid}", headers=bob, timeout=10).status_code == 404
        assert httpx.get(f"{srv.url}/v1/contexts", headers=bob, timeout=10).json()["data"] == []
        assert httpx.get(f"{srv.url}/v1/contexts", timeout=10).status_code == 401


def test_past_the_host_cap_a_context_is_read_back_from_its_file(model_dir, tmp_path):
    """--context-memory smaller than two contexts (each ~77 KB of kept entries): the least recently used one
    keeps only its file, and is loaded from it on its next use; its answers do not change. The pool (240
    blocks) is too small for the second context's prefill beside the first, idle, resident one: admission
    unloads the first, so its next use reads the file into the pool."""
    with torch_threads(1), live_server(str(model_dir), dtype="float32", kv_memory="480KiB",
                                       context_dir=str(tmp_path), context_memory="100KiB") as srv:
        client = _client(srv)
        first = _create(srv, words(1500, 6), kv_policy="snapkv", kv_budget="20%")["id"]
        before = _ask(client, first, QUESTIONS[2])[0]
        second = _create(srv, words(1500, 7), kv_policy="snapkv", kv_budget="20%")["id"]
        shown = {c["id"]: c for c in httpx.get(srv.url + "/v1/contexts", timeout=10).json()["data"]}
        assert not shown[first]["in_host_memory"] and shown[second]["in_host_memory"]
        _ask(client, second, QUESTIONS[3])
        loads = srv.metrics()["kvx:context_loads_total"]
        after = _ask(client, first, QUESTIONS[2])[0]  # from its file (and into the pool again if unloaded)
        assert after == before
        m = srv.metrics()
        assert m["kvx:context_loads_total"] == loads + 1 and m['kvx:context_bytes{tier="disk"}'] > 0
        assert m['kvx:context_bytes{tier="host"}'] <= 100 * 1024

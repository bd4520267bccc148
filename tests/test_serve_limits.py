"""Limits: a body over --max-body-bytes is a 413 before any parsing, a prompt longer than the context a
400 before any tokenizing, a stalled upload a 408 after --client-timeout, a client that stops reading a
stream loses its request (and its blocks); bad limit flags are one-line errors from the installed script."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serve_helpers import live_server, tiny_model_dir, torch_threads

CHAT = "/v1/chat/completions"
LIMIT = 128 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with torch_threads(1), live_server(str(tiny_model_dir(tmp_path_factory.mktemp("tiny"))), max_tokens=2,
                                       max_body_bytes="128KiB", client_timeout=1.0) as srv:
        yield srv


def chat_body(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 2}


def padded(size: int) -> bytes:
    """A valid chat body of exactly `size` bytes (JSON allows trailing spaces)."""
    raw = json.dumps(chat_body("w7 w8")).encode()
    return raw + b" " * (size - len(raw))


def test_a_body_at_the_limit_is_served_and_one_byte_more_is_a_413(server):
    assert httpx.post(server.url + CHAT, content=padded(LIMIT), timeout=30).status_code == 200
    r = httpx.post(server.url + CHAT, content=padded(LIMIT + 1), timeout=30)
    assert r.status_code == 413, r.text
    assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                 "param": None, "code": "request_too_large"}
    assert "128 KiB" in r.json()["error"]["message"]


def test_a_chunked_upload_over_the_limit_is_cut_without_buffering_it(server, monkeypatch):
    import kvx.serve.app as app_module

    parsed = []
    real = app_module.read_body

    async def recording(request, schema):
        parsed.append(schema)
        return await real(request, schema)

    monkeypatch.setattr(app_module, "read_body", recording)

    def chunks():  # no Content-Length: the server learns the size only as bytes arrive
        for _ in range(128):
            yield b" " * 8192

    r = httpx.post(server.url + CHAT, content=chunks(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert parsed == []  # no route saw it
    # a huge declared length is refused at once, before any byte of the body is read
    r = httpx.post(server.url + CHAT, content=b"x" * (4 * LIMIT), timeout=30)
    assert r.status_code == 413


def test_a_prompt_beyond_the_context_is_refused_before_tokenizing(server, monkeypatch):
    import kvx.serve.app as app_module

    calls = []
    real = app_module.chat_ids
    monkeypatch.setattr(app_module, "chat_ids", lambda *a: calls.append(1) or real(*a))
    text = " ".join(["assistant"] * 9000)  # > 4096 tokens by the bound alone (81000 / 18 = 4500)
    r = httpx.post(server.url + CHAT, json=chat_body(text), timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages" and "at least" in err["message"]
    assert calls == []
    # a prompt the bound lets through is still checked exactly after tokenizing
    r = httpx.post(server.url + "/v1/completions", json={"prompt": " ".join(["w9"] * 4200), "max_tokens": 1},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def _raw_request(url: str, head: bytes, body: bytes, wait: float) -> tuple[bytes, float]:
    """Send `head` and a part of the body, then stall; the server's answer and how long it took."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head + body)
        t0 = time.monotonic()
        s.settimeout(wait)
        data = b""
        try:
            while True:
                got = s.recv(65536)
                if not got:
                    break
                data += got
        except socket.timeout:
            pass
        return data, time.monotonic() - t0


def test_a_stalled_upload_is_a_408_after_the_client_timeout(server):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 500\r\n\r\n")
    data, took = _raw_request(server.url, head, b'{"messages": [', wait=10)
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"request_timeout" in data and 0.8 < took < 5
    m = server.wait_metrics(lambda m: m['kvx:request_errors_total{kind="client_timeout"}'] >= 1)
    assert m['kvx:request_errors_total{kind="client_timeout"}'] >= 1 and m["kvx:num_requests_waiting"] == 0


@pytest.mark.parametrize("head", [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le",
                                  b"GET /hea"])
def test_a_request_head_that_stalls_is_cut_after_the_client_timeout(server, head):
    """Slowloris: a connection that sends nothing, or part of a request line or headers, is closed once
    --client-timeout passes without a complete head; the server goes on serving."""
    data, took = _raw_request(server.url, head, b"", wait=10)
    assert data == b"" and 0.8 < took < 5, (data[:200], took)  # closed by the server, not by our wait
    # a keep-alive connection whose second head stalls is cut the same way
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b'"ok"' not in first:  # the head and the body may come in two packets
            got = s.recv(65536)
            assert got, first
            first += got
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        s.sendall(b"GET /heal")
        t0 = time.monotonic()
        rest = b""
        while got := s.recv(65536):
            rest += got
        assert rest == b"" and 0.8 < time.monotonic() - t0 < 5
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_a_stream_nobody_reads_is_cancelled_after_the_client_timeout():
    from kvx.serve.completion import _JobStream

    released = []

    class Loop:
        def release(self, job):
            released.append(job)

    async def forever():
        while True:
            yield "data: {}\n\n"
            await asyncio.sleep(0)

    async def run():
        sent = []

        async def send(message):
            sent.append(message["type"])
            if len(sent) > 3:
                await asyncio.Event().wait()  # the client's buffers are full: the write never completes

        async def receive():
            await asyncio.Event().wait()

        job = object()
        scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
        t0 = time.monotonic()
        await asyncio.wait_for(_JobStream(forever(), Loop(), job, send_timeout=0.3)(scope, receive, send), 10)
        return job, time.monotonic() - t0

    job, took = asyncio.run(run())
    assert released == [job] and 0.25 < took < 5


def _kvx_script() -> str:
    return str(Path(sys.executable).with_name("kvx"))


@pytest.mark.parametrize("args, fragment", [
    (["--max-body-bytes", "0"], "--max-body-bytes: memory size must be at least one byte"),
    (["--max-body-bytes", "lots"], "--max-body-bytes: cannot read"),
    (["--client-timeout", "0"], "--client-timeout must be a positive"),
    (["--timeout-keep-alive", "0"], "--timeout-keep-alive must be at least 1"),
])
def test_bad_limit_flags_are_one_line_errors_from_the_installed_script(args, fragment):
    proc = subprocess.run([_kvx_script(), "serve", "--model", "/no/such/model", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvx: error:") and fragment in lines[0], proc.stderr

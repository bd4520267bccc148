"""API keys: every route but /health (and /metrics without --metrics-key) refuses a missing or wrong key
with a 401 in the API's error shape and serves the right one; the official `openai` client sees
AuthenticationError; a public bind without a key warns; bad key options are one-line errors."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.routing import APIRoute

from kvx.errors import KvxError
from kvx.serve.keys import collect_keys, is_loopback, public_bind_warning
from serve_helpers import live_server, tiny_model_dir, torch_threads

KEYS = ("key-one", "key-two")
METRICS_KEY = "scrape-only"
OPEN = {"/health"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# the team's key\n\n{KEYS[1]}\n")
    with torch_threads(1), live_server(str(model_dir), api_keys=[KEYS[0]], api_key_file=str(key_file),
                                       metrics_key=METRICS_KEY, max_tokens=2) as srv:
        yield srv


def _body(path: str) -> dict | None:
    return {"/v1/chat/completions": {"messages": [{"role": "user", "content": "w7 w8"}], "max_tokens": 2},
            "/v1/completions": {"prompt": "w7 w8", "max_tokens": 2},
            "/tokenize": {"prompt": "w7 w8"},
            "/detokenize": {"tokens": [7, 8]},
            "/v1/contexts": {"text": "w7 w8 w9 w10", "kv_policy": "snapkv", "kv_budget": "50%"}}.get(path)


def every_route(server) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, path parameters filled in."""
    app = server.app
    # (a context id nobody made: a right key gets past the check to the route's 404)
    out = [(m, r.path.replace("{model_id:path}", "qwen2").replace("{context_id}", "ctx-" + "0" * 32))
           for r in app.routes if isinstance(r, APIRoute) for m in sorted(r.methods)]
    out += [("GET", app.openapi_url), ("GET", app.docs_url)]
    return out


def call(server, method: str, path: str, key: str | None) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.request(method, server.url + path, json=_body(path) if method == "POST" else None,
                         headers=headers, timeout=30)


def test_every_route_refuses_a_missing_or_wrong_key_and_serves_the_right_one(server):
    routes = every_route(server)
    assert {p for _, p in routes} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/qwen2",
                                      "/health", "/metrics"}
    for method, path in routes:
        right = METRICS_KEY if path == "/metrics" else KEYS[0]
        for key in (None, "wrong", KEYS[0][:-1], f"{right}x") + ((KEYS[0],) if path == "/metrics" else ()):
            r = call(server, method, path, key)
            if path in OPEN:
                assert r.status_code == 200, (method, path, key)
                continue
            assert r.status_code == 401, (method, path, key, r.text)
            assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                          "param": None, "code": "invalid_api_key"}}
            assert r.headers["www-authenticate"] == "Bearer"
        for key in (right,) + ((KEYS[1],) if path != "/metrics" else ()):
            r = call(server, method, path, key)
            assert r.status_code == (404 if "/v1/contexts/ctx-" in path else 200), (method, path, r.text)
    # a key refused says nothing of why beyond missing / not valid, and the scheme must be Bearer
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Basic {KEYS[0]}"}, timeout=10)
    assert r.status_code == 401 and "needs an API key" in r.json()["error"]["message"]


def test_the_openai_client_with_a_wrong_and_the_right_key(server):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0, timeout=30)
    right = openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[1], max_retries=0, timeout=30)
    ask = dict(model="qwen2", max_tokens=2, temperature=0)
    for fn in (lambda c: c.models.list(), lambda c: c.models.retrieve("qwen2"),
               lambda c: c.chat.completions.create(messages=[{"role": "user", "content": "w7"}], **ask),
               lambda c: c.completions.create(prompt="w7 w8", **ask),
               lambda c: list(c.chat.completions.create(messages=[{"role": "user", "content": "w7"}], stream=True,
                                                        **ask))):
        with pytest.raises(openai.AuthenticationError) as err:
            fn(wrong)
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
        assert fn(right)


def test_refusals_are_counted_and_nothing_ran(server):
    from kvx.serve.metrics import parse

    before = server.ctx.engine_loop.batch.generated_tokens
    for _ in range(3):
        assert call(server, "POST", "/v1/chat/completions", "wrong").status_code == 401
    assert server.ctx.engine_loop.batch.generated_tokens == before
    m = parse(httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, timeout=10).text)
    assert m['kvx:request_errors_total{kind="unauthorized"}'] >= 3


def test_keys_come_from_flags_file_and_environment(tmp_path):
    f = tmp_path / "k.txt"
    f.write_text("  alpha  \n# not a key\n\nbeta\nalpha\n")
    assert collect_keys(["gamma"], str(f), environ={"KVX_API_KEY": "delta"}) == ("gamma", "alpha", "beta", "delta")
    assert collect_keys([], None, environ={}) == ()
    assert collect_keys([], None, environ={"KVX_API_KEY": " env "}) == ("env",)
    for bad, fragment in [((["a b"], None), "spaces"), (([" "], None), "empty")]:
        with pytest.raises(KvxError, match=fragment):
            collect_keys(*bad, environ={})
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(KvxError, match="holds no key"):
        collect_keys([], str(empty), environ={})
    with pytest.raises(KvxError, match="cannot read"):
        collect_keys([], str(tmp_path / "missing.txt"), environ={})


@pytest.mark.parametrize("host, public", [("127.0.0.1", False), ("localhost", False), ("::1", False),
                                          ("127.0.0.2", False), ("0.0.0.0", True), ("::", True),
                                          ("192.168.1.4", True), ("example.org", True)])
def test_loopback_or_public(host, public):
    assert is_loopback(host) is not public
    warning = public_bind_warning(host, ())
    assert (warning is not None) is public
    assert public_bind_warning(host, ("k",)) is None
    if warning:
        assert "\n" not in warning and warning.startswith("kvx: warning:") and "--api-key" in warning


def _kvx_script() -> str:
    return str(Path(sys.executable).with_name("kvx"))


def _first_lines(args: list[str], env: dict, until: str, timeout: float = 120) -> list[str]:
    """stderr lines of `kvx serve ARGS` up to the one containing `until`, then stop it."""
    proc = subprocess.Popen([_kvx_script(), "serve", *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr] + [lines.put(None)], daemon=True).start()
    got, deadline = [], time.monotonic() + timeout
    try:
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                return got
            got.append(line.rstrip("\n"))
            if until in got[-1]:
                return got
    finally:
        proc.kill()
        proc.wait(30)


def test_a_public_bind_without_a_key_warns_in_one_line(model_dir):
    import os

    env = {k: v for k, v in os.environ.items() if k != "KVX_API_KEY"} | {"OMP_NUM_THREADS": "1"}
    args = ["--model", str(model_dir), "--port", "0", "--threads", "1", "--log-level", "warning"]
    lines = _first_lines(["--host", "0.0.0.0", *args], env, until="kvx: serving")
    warnings = [x for x in lines if x.startswith("kvx: warning:")]
    assert len(warnings) == 1 and "without an API key" in warnings[0], lines
    keyed = _first_lines(["--host", "0.0.0.0", *args], env | {"KVX_API_KEY": "k"}, until="kvx: serving")
    assert any("kvx: serving" in x for x in keyed) and not any("warning" in x for x in keyed), keyed


@pytest.mark.parametrize("args, fragment", [
    (["--api-key-file", "/no/such/keys.txt"], "--api-key-file: cannot read /no/such/keys.txt"),
    (["--api-key", "two words"], "--api-key: an API key must not contain spaces"),
    (["--metrics-key", " "], "--metrics-key: an API key is empty"),
])
def test_bad_key_options_are_one_line_errors_from_the_installed_script(args, fragment):
    proc = subprocess.run([_kvx_script(), "serve", "--model", "/no/such/model", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvx: error:") and fragment in lines[0], proc.stderr

"""`kvx serve` as a user starts it: flags checked before a model loads, --kv-memory sizes, and Ctrl-C /
SIGTERM draining open requests before the process exits."""

from __future__ import annotations

import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from kvx.errors import KvxError
from kvx.options import default_kv_memory, parse_memory
from serve_helpers import tiny_model_dir, words


def kvx(*args, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvx", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("text, value", [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
                                         ("123456", 123456), ("64 kib", 65536)])
def test_parse_memory(text, value):
    assert parse_memory(text) == value


@pytest.mark.parametrize("text", ["lots", "", "-1GiB", "0", "2 GiBs", "1e9"])
def test_parse_memory_refuses_what_is_not_a_size(text):
    with pytest.raises(KvxError):
        parse_memory(text)


def test_default_kv_memory_on_the_cpu_is_a_capped_share():
    assert 0 < default_kv_memory("cpu") <= 4 * 2**30


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`kvx ARGS` in this process (a subprocess costs seconds of imports on a busy machine)."""
    from kvx.cli import main

    monkeypatch.setattr(sys, "argv", ["kvx", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_the_options(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "serve", "--help")
    assert code == 0
    for option in ("--host", "--port", "--policy", "--budget", "--max-batch", "--kv-memory", "--max-queue",
                   "--prefill-step", "--api-key", "--api-key-file", "--metrics-key", "--max-body-bytes",
                   "--client-timeout", "--timeout-keep-alive"):
        assert option in out


@pytest.mark.parametrize("args, fragment", [
    (["--policy", "snapkv"], "needs a --budget"),
    (["--policy", "snapkv", "--budget", "200%"], "out of range"),
    (["--policy", "nope", "--budget", "5%"], "unknown policy"),
    (["--kv-memory", "lots"], "cannot read memory size"),
    (["--model", "/no/such/folder"], "model folder not found"),
    (["--prefill-step", "0"], "--prefill-step"),
    (["--prefill-step", "-3"], "--prefill-step"),
])
def test_bad_flags_are_one_line_errors_before_any_model_loads(monkeypatch, capsys, args, fragment):
    code, out, err = run_main(monkeypatch, capsys, "serve", *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvx: error:") and fragment in lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_model_dir(tmp_path_factory.mktemp("tiny")))


def test_busy_port_is_a_one_line_error(model_dir):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        proc = kvx("serve", "--model", model_dir, "--port", str(busy.getsockname()[1]), "--threads", "1")
    assert proc.returncode == 2 and "cannot listen on 127.0.0.1" in proc.stderr and "Traceback" not in proc.stderr


class ServeProcess:
    """`kvx serve` in a subprocess on a free port (--port 0: the start line says which)."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "kvx", "serve", "--port", "0", "--threads", "1", *args],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = None
        deadline = time.monotonic() + 120
        while self.url is None:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            if m:
                self.url = m.group(1)
        while httpx.get(self.url + "/health", timeout=10).status_code != 200:  # the engine thread has started
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def _drain(self) -> None:  # keep the pipe empty so the server never blocks on its log
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)])
def test_a_signal_drains_open_requests_then_exits(model_dir, sig, code):
    server = ServeProcess("--model", model_dir)
    try:
        body = {"messages": [{"role": "user", "content": words(30, 0)}], "max_tokens": 600, "temperature": 0,
                "stream": True}
        with httpx.Client(timeout=60) as client, client.stream("POST", server.url + "/v1/chat/completions",
                                                                json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            server.proc.send_signal(sig)
            rest = list(lines)  # the open stream runs to its end ...
        events = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
        assert rest[-1] == "data: [DONE]" or rest[-2] == "data: [DONE]"
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for e in events if e["choices"][0]["delta"].get("content")) == 600
        server.proc.wait(60)  # ... then the process exits
        assert server.proc.returncode == code, "".join(server.stderr)
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=5)
        assert "Traceback" not in "".join(server.stderr)
    finally:
        server.close()

"""Helpers for the server tests: a tiny checkpoint that has a tokenizer, and a real uvicorn server on a
free loopback port, run in a background thread and stopped after."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from checkpoints import VOCAB, make_checkpoint

# A word-level vocabulary: "w6" .. "w127" are the tiny model's ordinary tokens.
_WORDS = ["<unk>", "<s>", "</s>", "system", "user", "assistant"] + [f"w{i}" for i in range(6, VOCAB)]
_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
             "{% if add_generation_prompt %}assistant{% endif %}")


def tiny_model_dir(root: Path, positions: int = 4096) -> Path:
    """A random qwen2 checkpoint with 4096 positions, no EOS (answers run to max_tokens), a word-level
    tokenizer.json and a chat template: a folder `kvx generate --model` and `kvx serve --model` load."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path, _ = make_checkpoint("qwen2", root, max_position_embeddings=positions, eos_token_id=None)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": _TEMPLATE, "unk_token": "<unk>"}))
    return path


def words(n: int, seed: int) -> str:
    """n random ordinary tokens of the tiny vocabulary, as text."""
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(6, VOCAB, (n,), generator=g).tolist())


class LiveServer:
    def __init__(self, ctx, url: str, app=None):
        self.ctx = ctx  # the ServerContext (its engine loop and batch engine, for assertions)
        self.url = url
        self.app = app  # the FastAPI app (its routes and OpenAPI schema)

    def metrics(self) -> dict[str, float]:
        from kvx.serve.metrics import parse

        return parse(httpx.get(self.url + "/metrics", timeout=10).text)

    def wait_metrics(self, cond, timeout: float = 20.0) -> dict[str, float]:
        """Poll /metrics until cond(metrics) holds (bounded); returns the last metrics."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if cond(m) or time.monotonic() > deadline:
                return m
            time.sleep(0.05)


@contextmanager
def live_server(model: str | None, **settings):
    """Start `kvx serve`'s app for `model` (None: the default model) on 127.0.0.1 at a free port."""
    from kvx.serve.app import create_app
    from kvx.serve.server import build_context, uvicorn_server
    from kvx.serve.settings import ServeSettings

    settings.setdefault("kv_memory", "64MiB")
    settings.setdefault("log_level", "warning")
    settings.setdefault("drain_timeout", 5)
    serve_settings = ServeSettings(model=model, **settings)
    ctx = build_context(serve_settings, quiet=True)
    app = create_app(ctx, stop_timeout=30)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn_server(app, serve_settings)  # the server's own uvicorn configuration
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield LiveServer(ctx, f"http://127.0.0.1:{port}", app)
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"
        assert not ctx.engine_loop.alive, "the engine thread did not stop"


@contextmanager
def torch_threads(n: int):
    """Run with n torch threads (2 cores are shared on the test machine), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

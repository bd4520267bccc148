"""`kvx serve` end to end: load the model once, build the batched engine and its thread, serve with uvicorn.

uvicorn handles Ctrl-C and SIGTERM: it stops accepting connections, lets open requests finish (at most
`drain_timeout` seconds, after which their handlers are cancelled and their jobs with them), then the app's
lifespan stops the engine thread. A second Ctrl-C quits at once.
"""

from __future__ import annotations

import logging
import socket
import sys

from kvx.serve.settings import ServeSettings


def build_context(settings: ServeSettings, quiet: bool = False):
    """Load the model and build the engine loop: returns a ServerContext (the engine thread not started)."""
    import torch

    from kvx.models.hub import resolve_model
    from kvx.options import (check_prefill_step, default_kv_memory, load, parse_memory, policy_and_budget,
                             resolve_device)
    from kvx.runtime.engine.batch_engine import DEFAULT_MAX_BATCH, BatchEngine
    from kvx.runtime.engine.model_runner import ModelRunner
    from kvx.serve.completion import ServerContext
    from kvx.serve.engine_loop import EngineLoop
    from kvx.serve.keys import collect_keys, metrics_key
    from kvx.serve.prompts import longest_token

    # Every flag is checked before the model loads: a bad one fails at once.
    keys = collect_keys(settings.api_keys, settings.api_key_file)
    scrape_key = metrics_key(settings.metrics_key)
    max_body = check_limits(settings)
    policy_and_budget(settings.policy, settings.budget, settings.allocation, settings.policy_args,
                      settings.prefill_chunk)
    kv_memory = parse_memory(settings.kv_memory) if settings.kv_memory is not None else None
    check_prefill_step(settings.prefill_step)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    model, tokenizer = load(settings.model, device, settings.dtype, quiet=quiet)
    engine = ModelRunner(model, tokenizer, prefill_chunk=settings.prefill_chunk, use_graphs=settings.use_graphs)
    batch = BatchEngine(engine, kv_memory if kv_memory is not None else default_kv_memory(device),
                        settings.max_batch or DEFAULT_MAX_BATCH, prefill_step=settings.prefill_step)
    model_id = resolve_model(settings.model, quiet=True).name
    return ServerContext(EngineLoop(batch, settings.max_queue), tokenizer, model_id, settings.defaults(),
                         api_keys=keys, metrics_key=scrape_key, max_body_bytes=max_body,
                         client_timeout=settings.client_timeout, longest_token=longest_token(tokenizer))


def check_limits(settings: ServeSettings) -> int:
    """The body limit in bytes (--max-body-bytes takes sizes like 4MiB); KvxError for a limit that is not
    positive."""
    from kvx.errors import KvxError
    from kvx.options import parse_memory

    value = settings.max_body_bytes
    limit = parse_memory(value, "--max-body-bytes") if isinstance(value, str) else int(value)
    if limit < 1:
        raise KvxError("--max-body-bytes must be at least 1 byte")
    if not settings.client_timeout > 0:
        raise KvxError("--client-timeout must be a positive number of seconds")
    if settings.timeout_keep_alive < 1:
        raise KvxError("--timeout-keep-alive must be at least 1 second")
    return limit


def uvicorn_server(app, settings: ServeSettings):
    import uvicorn

    # timeout_keep_alive: an idle keep-alive connection is closed after this many seconds, so idle clients
    # cannot hold connections open; a stalled body or stream is cut by --client-timeout (limits.py).
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.drain_timeout, access_log=settings.log_level == "debug",
                            timeout_keep_alive=settings.timeout_keep_alive)
    return uvicorn.Server(config)


def serve(settings: ServeSettings) -> None:
    from kvx.errors import KvxError
    from kvx.runtime.memory import human_bytes
    from kvx.serve.app import create_app

    from kvx.serve.keys import public_bind_warning

    ctx = build_context(settings)
    app = create_app(ctx, stop_timeout=settings.drain_timeout)
    try:  # bind before announcing, so a busy port is a one-line error and not a uvicorn traceback
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        sock = socket.create_server((settings.host, settings.port), family=family)
    except OSError as exc:
        raise KvxError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    warning = public_bind_warning(settings.host, ctx.api_keys)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    stats = ctx.engine_loop.batch.stats()
    d = ctx.defaults
    policy = d.policy + (f" @ {d.budget}" if d.budget else "")
    print(f"kvx: serving {ctx.model_id} on http://{settings.host}:{sock.getsockname()[1]}/v1 · default policy "
          f"{policy} · KV pool {human_bytes(stats['bytes_total'])} ({stats['blocks_total']} blocks) · "
          f"max batch {ctx.engine_loop.batch.scheduler.max_batch}, queue {settings.max_queue}", file=sys.stderr, flush=True)
    logging.getLogger("kvx.serve").setLevel(settings.log_level.upper())
    uvicorn_server(app, settings).run(sockets=[sock])

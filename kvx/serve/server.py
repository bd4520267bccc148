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


def build_batch(settings: ServeSettings, kv_memory: int | None, tp=None, quiet: bool = False):
    """(the BatchEngine, the tokenizer): the model loaded (on a tensor-parallel rank, its slice: every rank's
    pool is then the smallest rank's, and rank 0's engine a LeaderBatch whose plans the others follow)."""
    import torch

    from kvx.options import default_kv_memory, load, resolve_device
    from kvx.runtime.engine.batch_engine import DEFAULT_MAX_BATCH, BatchEngine
    from kvx.runtime.engine.model_runner import ModelRunner

    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    if tp is None:
        model, tokenizer = load(settings.model, device, settings.dtype, quiet=quiet)
    else:
        from kvx.models.hub import resolve_model
        from kvx.options import load_rank

        model, tokenizer = load_rank(str(resolve_model(settings.model, quiet=True)), tp, device, settings.dtype)
    engine = ModelRunner(model, tokenizer, prefill_chunk=settings.prefill_chunk, use_graphs=settings.use_graphs)
    memory = kv_memory if kv_memory is not None else default_kv_memory(device)
    if tp is not None:
        memory = tp.min_int(memory)
    batch = BatchEngine(engine, memory, settings.max_batch or DEFAULT_MAX_BATCH, prefill_step=settings.prefill_step)
    if tp is not None and tp.rank == 0:
        from kvx.runtime.parallel.plan import LeaderBatch

        batch = LeaderBatch(batch, tp, fatal=True)
    return batch, tokenizer


def build_context(settings: ServeSettings, quiet: bool = False, tp=None):
    """Load the model and build the engine loop: returns a ServerContext (the engine thread not started).
    tp: rank 0's process group under kvx serve --tensor-parallel."""
    from kvx.models.hub import resolve_model
    from kvx.options import check_prefill_step, parse_memory, policy_and_budget
    from kvx.serve.completion import ServerContext
    from kvx.serve.compute_thread import ComputeThread
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
    context_memory = parse_memory(settings.context_memory, "--context-memory") if isinstance(
        settings.context_memory, str) else int(settings.context_memory)
    model_id = resolve_model(settings.model, quiet=True).name

    def build():
        batch, tokenizer = build_batch(settings, kv_memory, tp, quiet)
        return batch, tokenizer, build_contexts(batch, settings.context_dir, context_memory)

    # Everything that runs the model happens on the engine's thread, loading included (compute_thread.py).
    thread = ComputeThread("kvx-engine")
    try:
        batch, tokenizer, contexts = thread.run(build)
    except BaseException:
        thread.close()
        raise
    loop = EngineLoop(batch, settings.max_queue, thread=thread)
    loop.metrics.watch_contexts(contexts.stats)
    return ServerContext(loop, tokenizer, model_id, settings.defaults(),
                         api_keys=keys, metrics_key=scrape_key, max_body_bytes=max_body,
                         client_timeout=settings.client_timeout, longest_token=longest_token(tokenizer),
                         contexts=contexts)


def build_contexts(batch, directory: str | None, host_cap: int):
    """The stored contexts' registry, with the contexts of --context-dir made for this model loaded."""
    from kvx.serve.contexts import ContextRegistry

    registry = ContextRegistry(batch.engine, batch.pool.block_size, directory, host_cap)
    registry.block_bytes = batch.pool.block_bytes
    try:
        registry.load_directory()
    except OSError as exc:
        from kvx.errors import KvxError

        raise KvxError(f"--context-dir {directory}: {exc.strerror or exc}") from None
    return registry


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

    from kvx.serve.header_timeout import with_header_timeout

    # timeout_keep_alive: an idle keep-alive connection is closed after this many seconds, so idle clients
    # cannot hold connections open; a request head that does not arrive within --client-timeout closes its
    # connection (header_timeout.py); a stalled body or stream is cut by --client-timeout too (limits.py).
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.drain_timeout, access_log=settings.log_level == "debug",
                            timeout_keep_alive=settings.timeout_keep_alive,
                            http=with_header_timeout(settings.client_timeout))
    return uvicorn.Server(config)


def serve(settings: ServeSettings, tp=None) -> None:
    if settings.tensor_parallel != 1 and tp is None:
        from kvx.options import resolve_device
        from kvx.runtime.parallel.launch import run_ranks

        check_limits(settings)  # the cheap checks before any rank starts
        run_ranks(settings.tensor_parallel, serve_rank, (settings,), device=resolve_device(settings.device))
        return
    from kvx.errors import KvxError
    from kvx.runtime.memory import human_bytes
    from kvx.serve.app import create_app

    from kvx.serve.keys import public_bind_warning

    ctx = build_context(settings, tp=tp)
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
          f"max batch {ctx.engine_loop.batch.scheduler.max_batch}, queue {settings.max_queue}"
          + (f" · {len(ctx.contexts.entries)} stored contexts in {settings.context_dir}" if settings.context_dir else ""),
          file=sys.stderr, flush=True)
    logging.getLogger("kvx.serve").setLevel(settings.log_level.upper())
    uvicorn_server(app, settings).run(sockets=[sock])
    if tp is not None:
        ctx.engine_loop.batch.close()  # the engine thread has stopped: the other ranks stop following


def serve_rank(tp, settings: ServeSettings) -> None:
    """kvx serve --tensor-parallel: rank 0 serves (the HTTP server, the scheduler), the others follow its
    plans (runtime/parallel/plan.py)."""
    if tp.rank == 0:
        serve(settings, tp)
        return
    from kvx.options import parse_memory
    from kvx.runtime.parallel.plan import follow

    kv_memory = parse_memory(settings.kv_memory) if settings.kv_memory is not None else None
    batch, _ = build_batch(settings, kv_memory, tp, quiet=True)
    follow(batch, tp)

"""`kvx serve`: an OpenAI-compatible server over the batched engine (the server itself is kvx/serve/)."""

from __future__ import annotations

from typing import List, Optional

import typer

from kvx.serve.settings import (DEFAULT_CLIENT_TIMEOUT, DEFAULT_KEEP_ALIVE, DEFAULT_MAX_QUEUE, DEFAULT_MAX_TOKENS,
                                ServeSettings)


def serve_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hugging Face model folder (default: SmolLM2-135M-Instruct, pulled on first use)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free port)."),
    policy: str = typer.Option("full", "--policy", "-p", help="Default eviction policy; a request's kv_policy overrides it."),
    budget: Optional[str] = typer.Option(None, "--budget", "-b", help="Default KV budget ('5%' or tokens per kv head); kv_budget overrides it."),
    allocation: Optional[str] = typer.Option(None, "--allocation", help="Default allocator override: uniform, pyramid, ada, global."),
    policy_arg: List[str] = typer.Option([], "--policy-arg", help="Default policy option key=value (repeatable)."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", min=1, help="Most requests decoded together (default: the batched engine's, shown at start)."),
    kv_memory: Optional[str] = typer.Option(None, "--kv-memory", help="Size of the shared KV pool, e.g. 2GiB, 512MiB, 1.5GB (default: min(4 GiB, 1/4 of free memory) on the CPU, 60% of free GPU memory)."),
    max_queue: int = typer.Option(DEFAULT_MAX_QUEUE, "--max-queue", min=1, help="Most requests waiting to start; beyond it requests get 429."),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", min=1, help="Output tokens for a request that sets no max_tokens."),
    prefill_chunk: Optional[int] = typer.Option(None, "--prefill-chunk", help="Prefill N tokens at a time and evict between chunks (compressed requests then reserve budget + N, not the whole prompt)."),
    prefill_step: Optional[int] = typer.Option(None, "--prefill-step", help="Prefill a long prompt N tokens per engine step, exactly (nothing evicted in between), so running requests keep decoding (default: 512 on the CPU, 8192 on a GPU)."),
    no_graph: bool = typer.Option(False, "--no-graph", help="GPU: run the batched decode step eagerly instead of replaying CUDA graphs."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (CPU: int8 weights, float32 activations and cache; GPU: bfloat16), float32, bfloat16, float16."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for the model (default: torch's)."),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", min=0.0, help="Seconds open requests get to finish on Ctrl-C / SIGTERM before they are cancelled."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's log level: critical, error, warning, info, debug (debug also logs every request)."),
    api_key: List[str] = typer.Option([], "--api-key", help="Require `Authorization: Bearer KEY` on every route but /health and /metrics (repeatable; KVX_API_KEY adds one more)."),
    api_key_file: Optional[str] = typer.Option(None, "--api-key-file", help="Read accepted keys from a file, one per line ('#' comments and blank lines skipped)."),
    metrics_key: Optional[str] = typer.Option(None, "--metrics-key", help="Require this bearer key on /metrics (default: /metrics is open)."),
    max_body_bytes: str = typer.Option("4MiB", "--max-body-bytes", help="Largest request body, e.g. 4MiB or 100000; larger ones get 413 before any parsing."),
    client_timeout: float = typer.Option(DEFAULT_CLIENT_TIMEOUT, "--client-timeout", help="Seconds a client may take to send its request head (else the connection is closed) or its body (else 408), or to take a streamed chunk (else its request is cancelled)."),
    timeout_keep_alive: int = typer.Option(DEFAULT_KEEP_ALIVE, "--timeout-keep-alive", help="Seconds an idle keep-alive connection stays open."),
    tensor_parallel: int = typer.Option(1, "--tensor-parallel", "--tp", min=1, help="Split the model and its KV cache by kv head over N ranks (N local processes, or torchrun's); rank 0 serves."),
    context_dir: Optional[str] = typer.Option(None, "--context-dir", help="Keep stored contexts (POST /v1/contexts) as .kvc files in this folder: they survive a restart, and idle ones wait on disk instead of in memory."),
    context_memory: str = typer.Option("2GiB", "--context-memory", help="Host memory for stored contexts' kept entries; beyond it, contexts with a file (--context-dir) are read back from disk on use, and without one new contexts are refused (507)."),
) -> None:
    """Serve the OpenAI API (chat completions, completions, streaming) over the batched engine.

    Requests are batched as they arrive, over one shared KV pool.
    Each request may pick its compression with kv_policy, kv_budget, kv_allocation, kv_policy_args (the flags are the defaults).
    Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, POST /tokenize, POST /detokenize, GET /health, GET /metrics; stored contexts: POST /v1/contexts (compress a document once), GET /v1/contexts, GET /v1/contexts/{id}, DELETE /v1/contexts/{id}, and kv_context: <id> in a completion (only the request's own tokens are prefilled; concurrent requests share the context's blocks).
    Ctrl-C or SIGTERM stops taking connections and lets open requests end (--drain-timeout).
    Limits: bodies over --max-body-bytes get 413, prompts longer than the model's context 400 (both before tokenizing), slow clients are cut after --client-timeout, --max-queue bounds the waiting requests (429).
    With --api-key / --api-key-file / KVX_API_KEY, clients send `Authorization: Bearer KEY` (the openai client's api_key); listening beyond loopback without a key prints a warning.

    \b
    kvx serve --port 8000 --kv-memory 2GiB
    kvx serve --policy snapkv --budget 10% --max-batch 32
    kvx serve --host 0.0.0.0 --api-key-file keys.txt --metrics-key scrape-secret
    kvx serve --context-dir ~/kvx-contexts --kv-memory 2GiB
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}], "kv_policy": "laprox", "kv_budget": "5%"}'
    """
    from kvx.serve.server import serve

    serve(ServeSettings(model=model, host=host, port=port, policy=policy, budget=budget, allocation=allocation,
                        policy_args=list(policy_arg), max_batch=max_batch, kv_memory=kv_memory, max_queue=max_queue,
                        max_tokens=max_tokens, prefill_chunk=prefill_chunk, prefill_step=prefill_step, use_graphs=not no_graph, device=device, dtype=dtype,
                        threads=threads, drain_timeout=drain_timeout, log_level=log_level,
                        api_keys=list(api_key), api_key_file=api_key_file, metrics_key=metrics_key,
                        max_body_bytes=max_body_bytes, client_timeout=client_timeout,
                        timeout_keep_alive=timeout_keep_alive, tensor_parallel=tensor_parallel,
                        context_dir=context_dir, context_memory=context_memory))

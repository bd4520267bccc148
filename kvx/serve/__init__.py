"""`kvx serve`: an OpenAI-compatible HTTP server over the batched engine.

    settings.py     the server's flags, and the defaults each request inherits from them
    schemas.py      request bodies (pydantic): what the API defines, kvx's kv_* extras
    errors.py       the API's error shape for every failure a client can cause
    body.py         JSON body -> schema, or a 400
    compression.py  kv_policy / kv_budget / kv_allocation / kv_policy_args -> Policy, Budget
    prompts.py      chat messages or a completion prompt -> token ids
    translate.py    a validated body -> a GenerationRequest (sampling, stop, max tokens)
    engine_loop.py  the one thread that owns the BatchEngine; jobs in, text and results out
    completion.py   one request's life on the event loop: queue, wait or stream, cancel
    responses.py    response objects and SSE chunks
    metrics.py      /metrics through prometheus_client: vLLM's names under kvx:, a registry per server
    keys.py         where API keys come from (--api-key, --api-key-file, KVX_API_KEY); public-bind warning
    auth.py         the bearer-key middleware (before any body is read)
    limits.py       the body-size and slow-client middleware (413, 408)
    tokens.py       /tokenize and /detokenize
    openapi.py      request bodies in the OpenAPI schema
    app.py          the FastAPI routes
    server.py       model + engine + app + uvicorn, from the flags

The model runs in one background thread (the engine is single-threaded); the event loop only parses,
tokenizes (in a worker thread), queues and streams. A request's policy and budget are its own, so requests
with different compression share a decode batch.
"""

"""The HTTP routes: /v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize, /health,
/metrics.

The app's lifespan starts the engine thread and, at shutdown (after uvicorn has let open requests end),
stops it.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from kvx import __version__
from kvx.serve import metrics, openapi
from kvx.serve.auth import BearerAuth
from kvx.serve.limits import BodyLimit
from kvx.serve.body import read_body
from kvx.serve.completion import ServerContext, complete
from kvx.serve.errors import ApiError, install_handlers
from kvx.serve.prompts import chat_ids, chat_texts, completion_ids, completion_texts
from kvx.serve.responses import Reply
from kvx.serve import context_routes
from kvx.serve.contexts import context_question_ids
from kvx.serve.schemas import (ChatCompletionRequest, CompletionRequest, ContextCreateRequest, DetokenizeRequest,
                               TokenizeRequest)
from kvx.serve.tokens import detokenize, tokenize


def create_app(ctx: ServerContext, stop_timeout: float | None = 30.0) -> FastAPI:
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.engine_loop.start()
        try:
            yield
        finally:
            await run_in_threadpool(ctx.engine_loop.stop, stop_timeout)

    app = FastAPI(title="kvx", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API over kvx's batched engine, with the KV policy per request.")
    counters = ctx.engine_loop.metrics
    install_handlers(app, on_error=counters.error)
    app.add_middleware(BodyLimit, max_bytes=ctx.max_body_bytes, timeout=ctx.client_timeout,
                       on_refused=counters.error)
    # Added last, so outermost: a request without a key is refused before anything reads its body.
    app.add_middleware(BearerAuth, keys=ctx.api_keys, metrics_key=ctx.metrics_key,
                       on_refused=lambda: counters.error(401))

    @app.post("/v1/chat/completions", openapi_extra=openapi.body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        arrived = time.perf_counter()
        body = await read_body(request, ChatCompletionRequest)
        ctx.check_bound(chat_texts(body.messages), "messages")
        if body.kv_context is not None:  # the stored context precedes the messages: only they are prefilled
            entry = ctx.contexts.get(body.kv_context, context_routes.owner(ctx, request))
            ids = await run_in_threadpool(context_question_ids, ctx.tokenizer, entry, True, body)
            return await complete(ctx, body, ids, Reply("chat", ctx.model_id), "messages", request, arrived, entry)
        # Tokenizing a long prompt takes a while: off the event loop, like the model.
        ids = await run_in_threadpool(chat_ids, ctx.tokenizer, body.messages)
        return await complete(ctx, body, ids, Reply("chat", ctx.model_id), "messages", request, arrived)

    @app.post("/v1/completions", openapi_extra=openapi.body(CompletionRequest))
    async def completions(request: Request):
        arrived = time.perf_counter()
        body = await read_body(request, CompletionRequest)
        ctx.check_bound(completion_texts(body.prompt), "prompt")
        if body.kv_context is not None:
            entry = ctx.contexts.get(body.kv_context, context_routes.owner(ctx, request))
            if isinstance(body.prompt, list) and body.prompt and all(isinstance(t, int) for t in body.prompt):
                completion_ids(ctx.tokenizer, body.prompt)  # token ids checked against the vocabulary
            ids = await run_in_threadpool(context_question_ids, ctx.tokenizer, entry, False, body)
            return await complete(ctx, body, ids, Reply("text", ctx.model_id), "prompt", request, arrived, entry)
        ids = await run_in_threadpool(completion_ids, ctx.tokenizer, body.prompt)
        return await complete(ctx, body, ids, Reply("text", ctx.model_id), "prompt", request, arrived)

    @app.post("/v1/contexts", openapi_extra=openapi.body(ContextCreateRequest))
    async def create_context(request: Request):
        body = await read_body(request, ContextCreateRequest)
        return await context_routes.create(ctx, body, request)

    @app.get("/v1/contexts")
    async def list_contexts(request: Request):
        return context_routes.listing(ctx, request)

    @app.get("/v1/contexts/{context_id}")
    async def show_context(context_id: str, request: Request):
        return context_routes.show(ctx, context_id, request)

    @app.delete("/v1/contexts/{context_id}")
    async def delete_context(context_id: str, request: Request):
        return await context_routes.delete(ctx, context_id, request)

    max_model_len = ctx.engine_loop.batch.engine.config.max_position_embeddings

    @app.post("/tokenize", openapi_extra=openapi.body(TokenizeRequest))
    async def tokenize_route(request: Request):
        body = await read_body(request, TokenizeRequest)
        return await run_in_threadpool(tokenize, ctx.tokenizer, body, max_model_len)

    @app.post("/detokenize", openapi_extra=openapi.body(DetokenizeRequest))
    async def detokenize_route(request: Request):
        body = await read_body(request, DetokenizeRequest)
        return await run_in_threadpool(detokenize, ctx.tokenizer, body)

    card = {"id": ctx.model_id, "object": "model", "created": created, "owned_by": "kvx"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != ctx.model_id:
            raise ApiError(404, f"model {model_id!r} is not served here; this server serves {ctx.model_id!r}",
                           type="not_found_error", param="model", code="model_not_found")
        return card

    @app.get("/health")
    async def health():
        ok = ctx.engine_loop.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(counters.render(), media_type=metrics.CONTENT_TYPE)

    openapi.install(app, [ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest,
                          ContextCreateRequest])
    return app

"""One completion request on the event loop: queue it, then wait for its answer or stream it.

A handler owns its job until the job ends. However the handler stops — the client disconnected, the
stream was never read, the server gave up waiting at shutdown — its job is released: a job that has not
ended is cancelled, and its blocks go back to the pool at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvx.errors import KvxError
from kvx.runtime.engine.sequence import FINISHED
from kvx.serve import translate
from kvx.serve.engine_loop import ACCEPTED, BROKEN, REFUSED, TEXT, EngineLoop, Job, QueueFull, ShuttingDown
from kvx.serve.errors import ApiError, bad_request
from kvx.serve.responses import DONE, Reply, sse
from kvx.serve.prompts import fewest_tokens
from kvx.serve.settings import DEFAULT_CLIENT_TIMEOUT, DEFAULT_MAX_BODY_BYTES, RequestDefaults

log = logging.getLogger("kvx.serve")

_POLL_S = 0.25  # how often a waiting non-streaming handler checks that its client is still there
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServerContext:
    engine_loop: EngineLoop
    tokenizer: object
    model_id: str
    defaults: RequestDefaults
    api_keys: tuple[str, ...] = ()  # none: the API is open
    metrics_key: str | None = None  # none: /metrics is open
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    client_timeout: float = DEFAULT_CLIENT_TIMEOUT  # seconds to send a body, or to take a streamed chunk
    longest_token: int = 0  # prompts.longest_token; 0: no bound before tokenizing
    contexts: object = None  # kvx.serve.contexts.ContextRegistry (stored contexts, /v1/contexts)

    def check_length(self, n: int, param: str) -> None:
        try:
            self.engine_loop.batch.engine.check_length(n)  # reads the config only: safe off the engine thread
        except KvxError as exc:
            raise bad_request(str(exc), param, code="context_length_exceeded" if n else None) from None

    def check_bound(self, texts: list[str], param: str) -> None:
        """Refuse a prompt that cannot fit the context before tokenizing it (prompts.fewest_tokens)."""
        if not self.longest_token:
            return
        n = fewest_tokens(texts, self.longest_token)
        limit = self.engine_loop.batch.engine.config.max_position_embeddings
        if n >= limit:
            raise bad_request(f"the prompt has at least {n} tokens; the model's context is {limit} tokens", param,
                              code="context_length_exceeded")


class _JobStream(StreamingResponse):
    """An SSE response that releases its job however the response ends (even if never iterated).

    A client that stops reading without closing fills the socket's buffers, and then each send waits; after
    `send_timeout` seconds of waiting the response is abandoned, which cancels the job and frees its blocks.
    """

    def __init__(self, content, engine_loop: EngineLoop, job: Job, send_timeout: float | None = None):
        super().__init__(content, media_type="text/event-stream", headers=_STREAM_HEADERS)
        self._engine_loop, self._job, self._send_timeout = engine_loop, job, send_timeout

    async def __call__(self, scope, receive, send) -> None:
        timeout, stalled = self._send_timeout, []

        async def timed_send(message) -> None:
            try:
                await asyncio.wait_for(send(message), timeout)
            except asyncio.TimeoutError:
                stalled.append(True)
                raise

        try:
            await super().__call__(scope, receive, send if timeout is None else timed_send)
        except Exception:  # (Starlette may wrap it in an exception group: the flag says what it was)
            if not stalled:
                raise
            log.warning("a client took no streamed data for %g s: its request is cancelled", timeout)
        finally:
            self._engine_loop.release(self._job)


async def complete(ctx: ServerContext, body, prompt_ids: list[int], reply: Reply, prompt_param: str,
                   request: Request, arrived: float | None = None, context=None) -> Response:
    """Answer one completion; `context`: the stored context (a registry Entry) prompt_ids follow."""
    gen = translate.generation_request(body, prompt_ids, ctx.defaults, None if context is None else context.ctx)
    ctx.check_length(len(prompt_ids) + (0 if context is None else context.ctx.tokens), prompt_param)
    if context is not None:
        ctx.contexts.use(context)
    job = Job(gen, stream=body.stream, arrived=arrived)
    _submit(ctx.engine_loop, job)
    streaming = False
    try:
        kind, value = await job.next_event()
        if kind == ACCEPTED and body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            streaming = True  # from here the response releases the job
            return _JobStream(_events(job, reply, include_usage, ctx.engine_loop.metrics), ctx.engine_loop, job,
                              ctx.client_timeout)
        if kind == ACCEPTED:
            event = await _wait(job, request)
            if event is None:  # the client went away; nobody reads this
                return Response(status_code=499)
            kind, value = event
        if kind == REFUSED:
            raise bad_request(value, prompt_param)
        if kind == BROKEN:
            raise ApiError(500, value, type="server_error")
        if value.state != FINISHED:
            raise failure(value)
        return JSONResponse(reply.complete(value.results[0]))
    finally:
        if not streaming:
            ctx.engine_loop.release(job)


def failure(seq) -> ApiError:
    """The error of a request the engine failed: a 500 when the cause is a bug inside a step (the engine
    marks it `internal`), else a 400 (the request's own, e.g. --prefill-chunk with h2o)."""
    if getattr(seq, "internal", False):
        return ApiError(500, seq.error or "internal error in the engine", type="server_error")
    return bad_request(seq.error or "the request failed")


def _submit(engine_loop: EngineLoop, job: Job) -> None:
    try:
        engine_loop.submit(job)
    except QueueFull:
        raise ApiError(429, f"the server is busy: {engine_loop.max_queue} requests are already waiting; retry "
                       "shortly", type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from None


async def _wait(job: Job, request: Request):
    """The job's last event, or None if the client disconnected first."""
    while True:
        try:
            return await asyncio.wait_for(job.next_event(), _POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None


async def _events(job: Job, reply: Reply, include_usage: bool, metrics):
    """The SSE stream. An error after the 200 went out can only be an event: the stream's one error body
    (in the API's shape), then [DONE]; it is counted as its status would have been."""
    if reply.chat:
        yield sse(reply.chunk(role=True, with_usage=include_usage))
    while True:
        kind, value = await job.next_event()
        if kind == TEXT:
            yield sse(reply.chunk(value, with_usage=include_usage))
            continue
        if kind == BROKEN or value.state != FINISHED:
            err = ApiError(500, value, type="server_error") if kind == BROKEN else failure(value)
            metrics.error(err.status)
            yield sse(err.body())
        else:
            result = value.results[0]
            yield sse(reply.chunk(finish=result.finish_reason, with_usage=include_usage))
            if include_usage:
                yield sse(reply.usage_chunk(result))
        break
    yield DONE

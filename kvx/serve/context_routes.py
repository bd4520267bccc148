"""/v1/contexts: create (compress once), list, show and delete stored compressed contexts
(kvx/serve/contexts.py holds them)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from kvx.runtime.engine.sequence import FINISHED, GenerationRequest
from kvx.serve import compression
from kvx.serve.auth import presented_key
from kvx.serve.completion import ServerContext, _submit, _wait, failure
from kvx.serve.contexts import owner_of
from kvx.serve.engine_loop import ACCEPTED, BROKEN, REFUSED, Job
from kvx.serve.errors import ApiError, bad_request
from kvx.serve.prompts import _text
from kvx.serve.settings import RequestDefaults

DEFAULT_CONTEXT_POLICY = "kvzip"  # question-agnostic: one compression serves every question asked later
DEFAULT_CONTEXT_BUDGET = "10%"


def owner(ctx: ServerContext, request: Request) -> str:
    """The caller's identity for ownership: its key's hash when keys are on, else '' (everyone)."""
    return owner_of(presented_key(request.scope["headers"])) if ctx.api_keys else ""


def _document(body) -> tuple[str, str | None]:
    """(the document's text, the system message) of a create body."""
    if (body.text is None) == (body.messages is None):
        raise bad_request("give the document as `text` or as `messages` (one user message, optionally after a "
                          "system message)", "text")
    if body.text is not None:
        if not body.text.strip():
            raise bad_request("the document is empty", "text")
        return body.text, body.system
    msgs = body.messages
    roles = [m.role for m in msgs]
    if roles not in (["user"], ["system", "user"], ["developer", "user"]):
        raise bad_request("messages: one user message holding the document, optionally after a system message",
                          "messages")
    if body.system is not None:
        raise bad_request("give the system message once: in `messages` or as `system`", "system")
    text = _text(msgs[-1], len(msgs) - 1)
    if not text.strip():
        raise bad_request("the document is empty", "messages")
    return text, _text(msgs[0], 0) if len(msgs) == 2 else None


async def create(ctx: ServerContext, body, request: Request) -> Response:
    """Compress the document once (a store request on the engine) and register it."""
    from kvx.context_options import context_info
    from kvx.options import split_context_question

    text, system = _document(body)
    ctx.check_bound([text] + ([system] if system else []), "text")
    defaults = RequestDefaults(DEFAULT_CONTEXT_POLICY, DEFAULT_CONTEXT_BUDGET)
    policy, budget = compression.resolve(defaults, body.kv_policy, body.kv_budget, body.kv_allocation,
                                         body.kv_policy_args)
    tok = ctx.tokenizer
    raw = body.raw or not tok.has_chat_template
    ids, _ = await run_in_threadpool(split_context_question, tok, text, "", system, raw)
    ctx.check_length(len(ids), "text")
    runner = ctx.engine_loop.batch.engine
    name = "full" if policy is None else policy.name
    args = compression._policy_args(body.kv_policy_args) if body.kv_policy is not None else []
    info = context_info(runner.model, tok, runner.dtype, name, None if budget is None else str(budget),
                        body.kv_allocation, args, system, raw, len(ids))
    if budget is not None:  # exactly, not through its printed form
        info.budget = {"fraction": budget.fraction} if budget.fraction is not None else {"tokens": budget.tokens}
    gen = GenerationRequest(context_ids=ids, max_tokens=0, policy=policy, budget=budget, store=info)
    job = Job(gen, stream=False)
    _submit(ctx.engine_loop, job)
    try:
        kind, value = await job.next_event()
        if kind == ACCEPTED:
            event = await _wait(job, request)
            if event is None:
                return Response(status_code=499)
            kind, value = event
        if kind == REFUSED:
            raise bad_request(value, "text")
        if kind == BROKEN:
            raise ApiError(500, value, type="server_error")
        if value.state != FINISHED:
            raise failure(value)
        # On the engine's thread: writing the file touches tensors, which only that thread does
        # (compute_thread.py), and the event loop does not wait on the disk.
        who, stored = owner(ctx, request), value.stored
        entry = await ctx.engine_loop.call(lambda: ctx.contexts.add(stored, who, body.name))
    finally:
        ctx.engine_loop.release(job)
    return JSONResponse(ctx.contexts.describe(entry))  # 200, as the OpenAI API's creations answer


def listing(ctx: ServerContext, request: Request) -> dict:
    return {"object": "list", "data": [ctx.contexts.describe(e) for e in ctx.contexts.owned(owner(ctx, request))]}


def show(ctx: ServerContext, cid: str, request: Request) -> dict:
    return ctx.contexts.describe(ctx.contexts.get(cid, owner(ctx, request), param="context_id"))


async def delete(ctx: ServerContext, cid: str, request: Request) -> dict:
    """No new request may use it; requests already on it finish, then its blocks go back."""
    entry = ctx.contexts.get(cid, owner(ctx, request), param="context_id")
    contexts = ctx.engine_loop.batch.scheduler.contexts
    await ctx.engine_loop.call(lambda: ctx.contexts.delete_now(entry, contexts))
    ctx.contexts.forget(entry)
    return {"id": cid, "object": "kv_context.deleted", "deleted": True}

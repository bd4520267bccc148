"""A context compressed once and answered from later, for one command (`kvx compress`, `kvx generate
--load-context`): each runs as a batch of one on the engine (run_alone). The server runs the same requests
in its shared pool (kvx/serve/contexts.py)."""

from __future__ import annotations

from typing import Callable

from kvx.runtime.contexts.resident import ResidentContext
from kvx.runtime.contexts.stored import ContextInfo, StoredContext
from kvx.runtime.engine.batch_engine import run_alone
from kvx.runtime.engine.sampling import SamplingParams
from kvx.runtime.engine.sequence import GenerationRequest
from kvx.runtime.engine.state import GenerationResult


def compress_context(engine, context_ids: list[int], info: ContextInfo, policy=None, budget=None,
                     prefill_step: int | None = None) -> tuple[StoredContext, object]:
    """Prefill and compress `context_ids` as question-agnostic answering does; (the kept cache on the host,
    the request's timings)."""
    request = GenerationRequest(context_ids=list(context_ids), max_tokens=0, policy=policy or engine.policy,
                                budget=budget or engine.budget, store=info)
    seq = run_alone(engine, request, prefill_step=prefill_step)
    return seq.stored, seq.req.timings


def answer_from_context(engine, stored: StoredContext | ResidentContext, questions: list[list[int]],
                        params: SamplingParams = SamplingParams(), max_tokens: int = 256,
                        on_text: Callable[[int, str], None] | None = None, stop=()) -> list[GenerationResult]:
    """Answer each question from a stored context (or one already wrapped as a ResidentContext): nothing of
    the context is prefilled."""
    ctx = stored if isinstance(stored, ResidentContext) else ResidentContext(stored)
    request = GenerationRequest(context=ctx, question_ids=[list(q) for q in questions], params=params,
                                max_tokens=max_tokens, stop=tuple(stop),
                                on_text=None if on_text is None else (lambda seq, qi, piece: on_text(qi, piece)))
    return run_alone(engine, request).results

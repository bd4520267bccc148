"""What one request asks of the batched engine, and the state it moves through.

A request is either question-aware (a prompt: prefill, compress, decode) or question-agnostic (a context
compressed before any question is seen, then each question answered from the same compressed cache).
Each request carries its own policy, budget and sampling parameters, so requests with different policies
share a decode batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from kvx.runtime.engine.sampling import SamplingParams, make_generator


@dataclass
class GenerationRequest:
    prompt_ids: list[int] | None = None  # question-aware
    context_ids: list[int] | None = None  # question-agnostic: the context ...
    question_ids: list[list[int]] = field(default_factory=list)  # ... and its questions
    # A stored compressed context (kvx.runtime.contexts.resident.ResidentContext) the questions are asked
    # about instead of context_ids: nothing of it is prefilled, its blocks are shared with other requests.
    context: object | None = None
    # Compress context_ids and keep the result (a kvx.runtime.contexts.stored.ContextInfo describing it):
    # the finished Sequence's `stored` is the compressed context; no question is answered.
    store: object | None = None
    params: SamplingParams = SamplingParams()
    max_tokens: int = 256
    policy: object | None = None  # kvx.policies.Policy (None: the full cache)
    budget: object | None = None  # kvx.policies.Budget
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    stop_at_eos: bool = True
    id: object = None
    # Called with (sequence, question index, text piece) as text is produced (streaming).
    on_text: Callable[["Sequence", int, str], None] | None = None

    @property
    def agnostic(self) -> bool:
        return self.context_ids is not None or self.context is not None

    @property
    def context_tokens(self) -> int:
        """Tokens of the context (agnostic mode): the stored context's, or context_ids'."""
        return self.context.tokens if self.context is not None else len(self.context_ids)


WAITING, PREFILL, DECODE, FINISHED, CANCELLED, FAILED = "waiting", "prefill", "decode", "finished", "cancelled", "failed"


class Sequence:
    """A request inside the engine: its cache (engine SequenceState), reservation, decode state and results."""

    _next_id = 0

    def __init__(self, request: GenerationRequest, max_tokens: int):
        Sequence._next_id += 1
        self.seq_id = Sequence._next_id
        self.request = request
        self.max_tokens = max_tokens  # clipped to the model's context
        self.state = WAITING
        self.req = None  # kvx.runtime.engine.state.SequenceState once admitted
        self.reserved = 0  # blocks reserved in the pool
        self.results: list = []  # GenerationResult per question (one for a prompt)
        self.error: str | None = None
        self.internal = False  # the error is a bug (an exception inside a step), not the request's own
        self.question = 0  # the question being answered (agnostic mode)
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.cancel_requested = False
        # Decode state of the current answer.
        self.logits: torch.Tensor | None = None
        self.greedy_token: int | None = None  # the next token when the batch picked it with the others
        self.out_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stream = None
        self.generator = None
        self.decode_started = 0.0
        self.snapshot = None  # what a question rewinds to (agnostic mode)
        self.prefill_units = None  # the prefill in progress: a generator of its pieces or chunks
        self.prefix_tokens: int | None = None  # set when a prefilled request is adopted (BatchEngine.adopt)
        self.stored = None  # a store request's compressed context (kvx.runtime.contexts.stored.StoredContext)

    @property
    def done(self) -> bool:
        return self.state in (FINISHED, CANCELLED, FAILED)

    @property
    def prompt_tokens(self) -> int:
        r = self.request
        if self.prefix_tokens is not None:  # adopted: the prompt's length as its own engine counted it
            return self.prefix_tokens + (len(r.question_ids[self.question]) if r.agnostic else 0)
        if r.agnostic:
            return r.context_tokens + (len(r.question_ids[self.question]) if r.question_ids else 0)
        return len(r.prompt_ids)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens read from a stored context rather than prefilled."""
        return self.request.context.tokens if self.request.context is not None else 0

    def start_answer(self, logits: torch.Tensor, tokenizer) -> None:
        self.logits = logits
        self.greedy_token = None
        self.out_ids = []
        self.text = ""
        self.emitted = 0
        # Text is decoded as it comes only when someone reads it (streaming, stop strings).
        r = self.request
        self.stream = tokenizer.stream_decoder() if (r.on_text is not None or r.stop) else None
        self.generator = make_generator(self.request.params, torch.device("cpu"))
        self.decode_started = time.perf_counter()
        self.state = DECODE

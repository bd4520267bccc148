"""Continuous batching: many requests at once over one shared, paged, ragged KV pool.

Each `step()`:
1. admits waiting requests whose worst case the pool can still promise (scheduler.py);
2. runs one prefill unit — a piece of a newly admitted request's prompt (`prefill_step` tokens,
   split_prefill.py; or a `--prefill-chunk` chunk), its compression after the last piece, or a question
   of a question-agnostic request — so running sequences wait for at most one piece between their tokens;
3. samples every decoding sequence's next token (its own sampling parameters and seed), retires those
   that finished (their blocks go back to the pool at once), and feeds the rest through one batched
   decode step (batch_step.py); decode-time policies then evict inside their own blocks.

This is kvx's one engine: `kvx generate` runs a single prompt as a batch of one (run_alone: a pool sized to
its worst case), --jsonl, `kvx serve` and `kvx eval` run many. The model runner (engine.py) executes each
prefill unit and compression for one request; a request's output in a batch is the output it gets alone.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from kvx.errors import KvxError
from kvx.runtime.compression.batch_eviction import evict_batch
from kvx.runtime.engine.batch_step import BatchStepper
from kvx.runtime.compression.decode_eviction import DECODE_SLACK, evict_per_segment
from kvx.runtime.engine.model_runner import ModelRunner
from kvx.runtime.cache.paged_cache import PagedKVCache
from kvx.runtime.cache.pool import DEFAULT_BLOCK_SIZE, BlockPool
from kvx.runtime.engine.state import GenerationResult
from kvx.runtime.engine.sampling import SamplingParams, sample
from kvx.runtime.contexts.stored import capture
from kvx.runtime.engine.scheduler import Scheduler, blocks_needed, context_extra
from kvx.runtime.engine.sequence import (CANCELLED, DECODE, FAILED, FINISHED, PREFILL, GenerationRequest, Sequence)
from kvx.runtime.cache.snapshot import ContextSnapshot
from kvx.runtime.compression.split_prefill import default_prefill_step, prefill_pieces

DEFAULT_MAX_BATCH = 16


class BatchEngine:
    """The engine: requests in, results out, over one shared pool of `kv_memory` bytes (or `pool`)."""

    def __init__(self, engine: ModelRunner, kv_memory: int | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                 block_size: int = DEFAULT_BLOCK_SIZE, prefill_step: int | None = None,
                 prefill_first: bool = False, pool: BlockPool | None = None):
        if max_batch < 1:
            raise KvxError("--max-batch must be at least 1")
        if prefill_step is not None and prefill_step < 1:
            raise KvxError("--prefill-step must be a positive number of tokens")
        self.engine = engine
        # Prompt tokens prefilled per step when not --prefill-chunk (split_prefill.py: exact, no eviction
        # in between); None: the device's default.
        self.prefill_step = prefill_step or default_prefill_step(engine.device)
        # Throughput over latency: no decode step while an admitted request still has prompt to prefill, so
        # the batch fills up before it decodes (offline jobs, benchmarks of a full batch). Off: every step
        # decodes, and a long prompt costs the running sequences one piece's time per token, not its whole.
        self.prefill_first = prefill_first
        cfg = engine.config
        self.pool = pool or BlockPool.for_memory(kv_memory, cfg.num_kv_heads, cfg.head_dim, engine.dtype,
                                                 engine.device, block_size)
        self.scheduler = Scheduler(self.pool, cfg, max_batch, engine.prefill_chunk)
        self.stepper = BatchStepper(engine, self.pool)  # CUDA graphs on a GPU (engine.use_graphs)
        self.tokenizer = engine.tokenizer
        self.finished: list[Sequence] = []  # retired during the current step (step() returns and resets it)
        self.generated_tokens = 0  # over the engine's life (for /metrics and benchmarks)
        self.prefill_s = 0.0  # wall time in prefill units (prompts, questions) over the engine's life
        self.decode_s = 0.0  # wall time in batched decode steps (sampling included)
        self.decode_steps = 0
        self.max_running = 0  # most sequences decoding in one step
        self.internal_errors = 0  # steps that failed with a bug, not a request's own error (see _guarded)
        self.last_internal_error: Exception | None = None
        # Tensor parallel (runtime/parallel): every rank runs these same steps; the tokens are rank 0's, and
        # a request is admitted only when every rank's pool can promise its share.
        self.tp = getattr(getattr(engine, "model", None), "tp", None)
        if self.tp is not None:
            self.scheduler.agree = self.tp.agree

    # -- requests ---------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Sequence:
        """Queue a request; KvxError at once if it can never run (too long, or larger than the pool)."""
        max_tokens = clip_max_tokens(self.engine, request)
        if request.context is not None and request.context.deleted:
            raise KvxError("the stored context was deleted")
        seq = Sequence(request, max_tokens)
        if not self.scheduler.fits_ever(seq):
            need = self.scheduler.need(seq) * self.pool.block_bytes
            from kvx.runtime.memory import human_bytes

            raise KvxError(f"the request needs {human_bytes(need)} of KV cache, more than the whole pool "
                           f"({human_bytes(self.pool.bytes_total)}): raise --kv-memory, lower --max-tokens or "
                           "compress it (--policy ... --budget ...)")
        self.scheduler.waiting.append(seq)
        return seq

    @staticmethod
    def adoption_blocks(engine, block_size: int, req, request: GenerationRequest) -> tuple[int, int, int]:
        """(blocks to reserve, extra slots per segment, clipped max_tokens) for adopting `req`."""
        limit = engine.config.max_position_embeddings
        longest = max((len(q) for q in request.question_ids), default=0) if request.agnostic else 0
        max_tokens = max(0, min(request.max_tokens, limit - req.position - longest))
        extra = longest + (DECODE_SLACK if req.evicts_while_decoding else max_tokens)
        need = sum(-(-(n + extra) // block_size) for lc in req.cache.layers for n in lc.lengths)
        if request.agnostic and req.evicts_while_decoding:
            need *= 2
        return need, extra, max_tokens

    def adopt(self, req, request: GenerationRequest, logits=None) -> Sequence:
        """Join a request already prefilled and compressed elsewhere (an eval fork) to the batch.

        Aware (request.prompt_ids): it decodes from `logits`; agnostic (request.context_ids and one or more
        question_ids): each question is prefilled over its compressed context. A cache already in this
        pool (compressed into it) is taken as it is, another is copied in (the caller drops the original);
        KvxError if the pool cannot promise its blocks now.
        """
        need, extra, max_tokens = self.adoption_blocks(self.engine, self.pool.block_size, req, request)
        seq = Sequence(request, max_tokens)
        fits = self.pool.can_reserve(need)
        if self.tp is not None:
            fits = self.tp.agree(fits)  # every rank adopts, or none
        if not fits:
            raise KvxError(f"the KV pool cannot take another {need} blocks now")
        self.pool.reserve(need)
        seq.reserved = need
        seq.prefix_tokens = req.position
        if req.cache.pool is self.pool:  # compressed straight into this pool (ModelRunner.compress(pool=...))
            req.cache.make_room(extra)
        else:
            req.cache = PagedKVCache.copy_of(req.cache, self.pool, extra)
        seq.req = req
        self.scheduler.running.append(seq)
        if request.agnostic:
            seq.snapshot = ContextSnapshot(req)
            seq.state = PREFILL
        else:
            seq.start_answer(logits, self.tokenizer)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a request now (a client went away); its blocks return to the pool at once."""
        if not seq.done:
            self._retire(seq, CANCELLED)

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def run(self) -> list[Sequence]:
        """Step until every submitted request is done; returns them in the order they finished."""
        done = []
        while self.has_work:
            done += self.step()
        done += self.finished  # a cancel between steps
        self.finished = []
        return done

    def stats(self) -> dict:
        s = self.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting), **self.pool.stats(),
                "generated_tokens": self.generated_tokens}

    # -- the loop -----------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """One scheduler iteration; returns the sequences that finished in it."""
        done_before, self.finished = self.finished, []  # cancels since the last step are reported now
        self.scheduler.admit()
        pending = [s for s in self.scheduler.running if s.state == PREFILL or s.req is None]
        if pending:
            t0 = time.perf_counter()
            self._guarded([pending[0]], self._prefill, pending[0])
            self.prefill_s += time.perf_counter() - t0
            if self.prefill_first:
                self.scheduler.admit()  # whoever the finished prefill's shrunk reservation lets in
                if any(s.state == PREFILL or s.req is None for s in self.scheduler.running):
                    done, self.finished = done_before + self.finished, []
                    return done
        t0 = time.perf_counter()
        self._guarded([s for s in self.scheduler.running if s.state == DECODE], self._decode)
        self.decode_s += time.perf_counter() - t0
        done, self.finished = done_before + self.finished, []
        return done

    def _guarded(self, concerned: list[Sequence], fn, *args) -> None:
        """Run one unit of work; if it fails, only the sequences it concerns fail, and their blocks go back
        to the pool at once. A KvxError is the request's own (e.g. --prefill-chunk with h2o): its message
        is the error. Anything else is a bug: the sequences fail with it as an internal error (so a server
        keeps serving the others), and `internal_errors` counts it."""
        try:
            fn(*args)
        except KvxError as exc:
            for seq in concerned:
                seq.error = str(exc)
                self._retire(seq, FAILED)
        except Exception as exc:  # noqa: BLE001 - a failing step must not take its blocks with it
            self.internal_errors += 1
            self.last_internal_error = exc
            for seq in concerned:
                if not seq.done:
                    seq.error = f"internal error: {type(exc).__name__}: {exc}"
                    seq.internal = True
                    self._retire(seq, FAILED)

    # -- prefill ----------------------------------------------------------------------------------
    def _prefill(self, seq: Sequence) -> None:
        """One prefill unit of seq: a piece of its prompt (split_prefill.py) or a chunk (--prefill-chunk),
        and after the last one its compression; or, for a question-agnostic request already compressed,
        its next question."""
        eng = self.engine
        r = seq.request
        if seq.req is None and r.context is not None:
            self._open_context(seq)
            return
        if seq.req is None:
            seq.state = PREFILL
            ids = r.context_ids if r.agnostic else r.prompt_ids
            n = len(ids)
            # An uncompressed prompt gets its decode headroom up front, in the same allocation: each segment's
            # blocks then follow each other in the pool (the CPU decode reads them as one slice).
            full = (r.policy is None or r.policy.name == "full" or r.budget is None) and not r.agnostic
            capacity = n + seq.max_tokens if full else min(n, eng.prefill_chunk or n)
            req = eng.new_request(self.pool, capacity=capacity, policy=r.policy, budget=r.budget)
            seq.req = req
            if not req.compresses and not r.agnostic:
                req.cache.make_room(n + seq.max_tokens)
            if eng.prefill_chunk:
                seq.prefill_units = eng.prefill_chunks(req, ids, eng.prefill_chunk)
            else:
                seq.prefill_units = prefill_pieces(eng, req, ids, self.prefill_step)
        if seq.prefill_units is not None:
            try:
                next(seq.prefill_units)  # one chunk or piece; running sequences decode before the next
                return
            except StopIteration as done:
                seq.prefill_units = None
                self._compress(seq, *done.value)
                return
        self._start_question(seq)

    def _open_context(self, seq: Sequence) -> None:
        """A request on a stored context: its cache reads the context's blocks (loaded into the pool if they
        are not there), nothing of the context is prefilled; then its first question."""
        seq.state = PREFILL
        ctx = seq.request.context
        ctx.load()
        seq.req = ctx.open_request(self.engine, context_extra(seq))
        seq.snapshot = ContextSnapshot(seq.req)
        self._start_question(seq)

    def _compress(self, seq: Sequence, logits, final_budget) -> None:
        eng, req, r = self.engine, seq.req, seq.request
        if r.store is not None:  # compress and keep: the context leaves the pool with the request
            eng.compress(req, headroom=0, budget=final_budget)
            seq.stored = capture(req, r.store)
            if getattr(eng.model, "tp", None) is not None:  # every rank at this step: rank 0 gets the whole
                from kvx.runtime.parallel.stored_shards import gather_context  # model's, the others None

                seq.stored = gather_context(seq.stored, eng.model)
            self._retire(seq, FINISHED)
            return
        if r.agnostic:
            eng.compress(req, headroom=0, budget=final_budget)
            longest = max(len(q) for q in r.question_ids)
            req.cache.make_room(longest + (DECODE_SLACK if req.evicts_while_decoding else seq.max_tokens))
            seq.snapshot = ContextSnapshot(req)
            grow = req.cache.blocks_held() if req.evicts_while_decoding else 0  # each answer's copy
            self.scheduler.shrink(seq, req.cache.blocks_held() + grow)
            self._start_question(seq)
            return
        eng.compress(req, headroom=seq.max_tokens, budget=final_budget)
        self.scheduler.shrink(seq, req.cache.blocks_held())
        seq.start_answer(logits, self.tokenizer)

    def _start_question(self, seq: Sequence) -> None:
        """Prefill question `seq.question` over the compressed context and start its answer."""
        eng, req = self.engine, seq.req
        q_ids = seq.request.question_ids[seq.question]
        seq.snapshot.begin_answer(req)
        t0 = time.perf_counter()
        logits = eng.forward(req, q_ids)
        req.timings.prefill_s += time.perf_counter() - t0
        seq.start_answer(logits, self.tokenizer)

    # -- decode -----------------------------------------------------------------------------------
    def _decode(self) -> None:
        running = [s for s in self.scheduler.running if s.state == DECODE]
        go, tokens = [], []
        limit = self.engine.config.max_position_embeddings
        if self.tp is not None:
            self._agree_tokens(running)
        for seq in running:
            tok = self._sample(seq)
            if tok is None:
                continue
            if len(seq.out_ids) >= seq.max_tokens or seq.req.position >= limit:
                self._end_answer(seq, "length")
                continue
            go.append(seq)
            tokens.append(tok)
        if not go:
            return
        self.decode_steps += 1
        self.max_running = max(self.max_running, len(go))
        with torch.inference_mode():
            logits = self.stepper.step([s.req for s in go], tokens)
        # The greedy sequences' next tokens in one op and one small transfer: a GPU sends back S indices,
        # not S vocabulary-sized rows (host-side, 21 rows of a 128k vocabulary took 5 ms per step).
        greedy = [i for i, s in enumerate(go) if s.request.params.temperature <= 0]
        rows = logits if len(greedy) == len(go) else logits[greedy]  # (the usual case copies nothing)
        picks = rows.argmax(-1).tolist() if greedy else []
        for i, tok in zip(greedy, picks):
            go[i].greedy_token = tok
        for i, seq in enumerate(go):
            seq.logits = logits[i]
        self._decode_evict([s.req for s in go if s.req.evicts_while_decoding])

    def _decode_evict(self, reqs: list) -> None:
        """Decode-time policies back to budget: every request with a batched rule in one pass
        (batch_eviction.py, its time shared among them), the others one by one."""
        if not reqs:
            return
        t0 = time.perf_counter()
        rest = evict_batch(self.engine, reqs)
        left = {id(r) for r in rest}
        batched = [r for r in reqs if id(r) not in left]
        share = (time.perf_counter() - t0) / max(1, len(batched))
        for req in batched:
            req.timings.decode_evict_s += share
        for req in rest:
            te = time.perf_counter()
            evict_per_segment(self.engine, req)
            req.timings.decode_evict_s += time.perf_counter() - te

    def _agree_tokens(self, running: list[Sequence]) -> None:
        """Tensor parallel: every rank takes the tokens rank 0 picked (one broadcast per step), so the
        ranks never diverge even where their logits could differ in the last bit."""
        live = [s for s in running if s.max_tokens != 0]
        picks = [s.greedy_token if s.greedy_token is not None else sample(s.logits, s.request.params, s.generator)
                 for s in live]
        for seq, tok in zip(live, self.tp.broadcast_ints(picks, len(live))):
            seq.greedy_token = tok

    def _sample(self, seq: Sequence) -> int | None:
        """Sample seq's next token and stream it; None when the answer ended (eos, stop string, cancel)."""
        if seq.max_tokens == 0:
            self._end_answer(seq, "length")
            return None
        r = seq.request
        if seq.greedy_token is not None:  # picked with the rest of the batch (_decode)
            tok, seq.greedy_token = seq.greedy_token, None
        else:
            tok = sample(seq.logits, r.params, seq.generator)
        if r.stop_at_eos and tok in self.tokenizer.eos_token_ids:
            self._end_answer(seq, "eos")
            return None
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        seq.out_ids.append(tok)
        self.generated_tokens += 1
        if seq.stream is None:
            return tok
        piece = seq.stream.push(tok)
        seq.text += piece
        if r.stop and piece:
            # A stop string ending in the new piece starts at most len(stop) - 1 characters before it: scan
            # only from there, not the whole answer again at every token.
            scan = max(0, len(seq.text) - len(piece) - max(len(s) for s in r.stop) + 1)
            hit = min((i for i in (seq.text.find(s, scan) for s in r.stop) if i >= 0), default=-1)
            if hit >= 0:
                seq.text = seq.text[:hit]
                self._end_answer(seq, "stop")
                return None
        self._emit(seq, hold=max((len(s) for s in r.stop), default=1) - 1)
        return tok

    def _emit(self, seq: Sequence, hold: int = 0) -> None:
        """Stream the text not yet sent, holding back what could still be the start of a stop string."""
        upto = max(seq.emitted, len(seq.text) - hold)
        if upto > seq.emitted and seq.request.on_text is not None:
            seq.request.on_text(seq, seq.question, seq.text[seq.emitted:upto])
        seq.emitted = upto

    def _end_answer(self, seq: Sequence, finish: str) -> None:
        eng, req, r = self.engine, seq.req, seq.request
        if seq.stream is not None:
            if finish != "stop":
                seq.text += seq.stream.flush()
            self._emit(seq)
        req.timings.decode_s += time.perf_counter() - seq.decode_started
        # What was streamed is the answer's text (the stream decodes exactly the tokens kept).
        text = seq.text if seq.stream is not None else self.tokenizer.decode(seq.out_ids)
        res = eng.result(req, seq.prompt_tokens, list(seq.out_ids), text, finish)
        res.cached_tokens = seq.cached_tokens
        seq.results.append(res)
        if r.agnostic and seq.question + 1 < len(r.question_ids):
            seq.snapshot.restore(req)
            seq.question += 1
            seq.state = PREFILL  # the next question is the next prefill unit
            return
        self._retire(seq, FINISHED)

    def _retire(self, seq: Sequence, state: str) -> None:
        if seq.req is not None:
            seq.req.cache.release()
            if seq.snapshot is not None:
                seq.snapshot.release(seq.req)
        self.scheduler.finish(seq)
        seq.state = state
        self.finished.append(seq)


def clip_max_tokens(engine: ModelRunner, request: GenerationRequest) -> int:
    """The request's max_tokens clipped to what the model's context leaves after its prompt (and longest
    question); KvxError for an empty or too long prompt, or a context without questions."""
    limit = engine.config.max_position_embeddings
    if request.store is not None:
        engine.check_length(len(request.context_ids))
        return 0
    if request.agnostic:
        if not request.question_ids:
            raise KvxError("a context needs at least one question")
        n = request.context_tokens
        engine.check_length(n)
        longest = max(len(q) for q in request.question_ids)
        engine.check_length(n + longest)
        return max(0, min(request.max_tokens, limit - n - longest))
    n = len(request.prompt_ids)
    engine.check_length(n)
    return max(0, min(request.max_tokens, limit - n))


def run_alone(engine: ModelRunner, request: GenerationRequest, prefill_step: int | None = None) -> Sequence:
    """One request as a batch of one, in a pool sized to its worst case (scheduler.worst_case_blocks: the
    same figure the memory check compares with the free memory), prefilled in one piece unless
    `prefill_step` says otherwise. Returns the finished Sequence (its results); a request's own error is a
    KvxError, a bug is raised as such."""
    cfg = engine.config
    probe = BlockPool(1, DEFAULT_BLOCK_SIZE, cfg.head_dim, engine.dtype, "meta")
    seq = Sequence(request, clip_max_tokens(engine, request))
    need = blocks_needed(seq, cfg, probe.block_size, engine.prefill_chunk)
    if request.context is not None:
        if request.context.resident and request.context.users == 0:
            request.context.unload()  # resident in an earlier run's pool: this run has a pool of its own
        need += request.context.blocks(probe.block_size)
    batch = BatchEngine(engine, need * probe.block_bytes, max_batch=1, prefill_step=prefill_step or (1 << 62))
    seq = batch.submit(request)
    batch.run()
    if seq.state == FAILED:
        if seq.internal:
            raise RuntimeError(seq.error) from batch.last_internal_error
        raise KvxError(seq.error)
    return seq


def generate(engine: ModelRunner, prompt_ids: list[int], params: SamplingParams = SamplingParams(), max_tokens: int = 256,
             on_text: Callable[[str], None] | None = None, policy=None, budget=None,
             stop_at_eos: bool = True) -> GenerationResult:
    """Question-aware, one prompt alone (run_alone): prefill, compress, decode. policy/budget default to the
    engine's."""
    request = GenerationRequest(prompt_ids=list(prompt_ids), params=params, max_tokens=max_tokens,
                                policy=policy or engine.policy, budget=budget or engine.budget,
                                stop_at_eos=stop_at_eos,
                                on_text=None if on_text is None else (lambda seq, qi, piece: on_text(piece)))
    return run_alone(engine, request).results[0]


def generate_agnostic(engine: ModelRunner, context_ids: list[int], questions: list[list[int]],
                      params: SamplingParams = SamplingParams(), max_tokens: int = 256,
                      on_text: Callable[[int, str], None] | None = None, policy=None,
                      budget=None) -> list[GenerationResult]:
    """Question-agnostic, one context alone (run_alone): prefill and compress the context, then answer each
    question from the same compressed cache (restored between questions, never recomputed)."""
    request = GenerationRequest(context_ids=list(context_ids), question_ids=[list(q) for q in questions],
                                params=params, max_tokens=max_tokens, policy=policy or engine.policy,
                                budget=budget or engine.budget,
                                on_text=None if on_text is None else (lambda seq, qi, piece: on_text(qi, piece)))
    return run_alone(engine, request).results

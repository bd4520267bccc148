"""Continuous batching: many requests at once over one shared, paged, ragged KV pool.

Each `step()`:
1. admits waiting requests whose worst case the pool can still promise (scheduler.py);
2. runs one prefill unit — a piece of a newly admitted request's prompt (`prefill_step` tokens,
   split_prefill.py; or a `--prefill-chunk` chunk), its compression after the last piece, or a question
   of a question-agnostic request — so running sequences wait for at most one piece between their tokens;
3. samples every decoding sequence's next token (its own sampling parameters and seed), retires those
   that finished (their blocks go back to the pool at once), and feeds the rest through one batched
   decode step (batch_step.py); decode-time policies then evict inside their own blocks.

Prefill, compression and decode-time eviction are the single-sequence engine's own code (engine.py) over a
PagedKVCache, so a request's output in a batch is the output it gets alone.
"""

from __future__ import annotations

import time

import torch

from kvx.errors import KvxError
from kvx.runtime.batch_eviction import evict_batch
from kvx.runtime.batch_step import BatchStepper
from kvx.runtime.decode_eviction import DECODE_SLACK
from kvx.runtime.engine import Engine
from kvx.runtime.paged_cache import PagedKVCache
from kvx.runtime.pool import DEFAULT_BLOCK_SIZE, BlockPool
from kvx.runtime.request import GenerationResult
from kvx.runtime.sampling import sample
from kvx.runtime.scheduler import Scheduler
from kvx.runtime.sequence import (CANCELLED, DECODE, FAILED, FINISHED, PREFILL, GenerationRequest, Sequence)
from kvx.runtime.snapshot import ContextSnapshot
from kvx.runtime.split_prefill import default_prefill_step, prefill_pieces

DEFAULT_MAX_BATCH = 16


class BatchEngine:
    def __init__(self, engine: Engine, kv_memory: int, max_batch: int = DEFAULT_MAX_BATCH,
                 block_size: int = DEFAULT_BLOCK_SIZE, prefill_step: int | None = None,
                 prefill_first: bool = False):
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
        self.pool = BlockPool.for_memory(kv_memory, cfg.num_kv_heads, cfg.head_dim, engine.dtype, engine.device,
                                         block_size)
        self.scheduler = Scheduler(self.pool, cfg, max_batch, engine.prefill_chunk)
        self.stepper = BatchStepper(engine, self.pool)  # CUDA graphs on a GPU (engine.use_graphs)
        self.tokenizer = engine.tokenizer
        self.finished: list[Sequence] = []  # retired during the current step (step() returns and resets it)
        self.generated_tokens = 0  # over the engine's life (for /metrics and benchmarks)
        self.prefill_s = 0.0  # wall time in prefill units (prompts, questions) over the engine's life
        self.decode_s = 0.0  # wall time in batched decode steps (sampling included)
        self.decode_steps = 0
        self.max_running = 0  # most sequences decoding in one step

    # -- requests ---------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Sequence:
        """Queue a request; KvxError at once if it can never run (too long, or larger than the pool)."""
        eng = self.engine
        limit = eng.config.max_position_embeddings
        if request.agnostic:
            if not request.question_ids:
                raise KvxError("a context needs at least one question")
            n = len(request.context_ids)
            eng.check_length(n)
            longest = max(len(q) for q in request.question_ids)
            eng.check_length(n + longest)
            max_tokens = max(0, min(request.max_tokens, limit - n - longest))
        else:
            n = len(request.prompt_ids)
            eng.check_length(n)
            max_tokens = max(0, min(request.max_tokens, limit - n))
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
        extra = longest + (DECODE_SLACK if req.decode_mode else max_tokens)
        need = sum(-(-(n + extra) // block_size) for lc in req.cache.layers for n in lc.lengths)
        if request.agnostic and req.decode_mode:
            need *= 2
        return need, extra, max_tokens

    def adopt(self, req, request: GenerationRequest, logits=None) -> Sequence:
        """Join a request already prefilled and compressed on its own (an eval fork) to the batch.

        Aware (request.prompt_ids): it decodes from `logits`; agnostic (request.context_ids and one or more
        question_ids): each question is prefilled over its compressed context. Its cache is copied into the
        pool (the caller drops the original); KvxError if the pool cannot hold it now.
        """
        need, extra, max_tokens = self.adoption_blocks(self.engine, self.pool.block_size, req, request)
        seq = Sequence(request, max_tokens)
        if not self.pool.can_reserve(need):
            raise KvxError(f"the KV pool cannot take another {need} blocks now")
        self.pool.reserve(need)
        seq.reserved = need
        seq.prefix_tokens = req.position
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
            self._guarded(pending[0], self._prefill)
            self.prefill_s += time.perf_counter() - t0
            if self.prefill_first:
                self.scheduler.admit()  # whoever the finished prefill's shrunk reservation lets in
                if any(s.state == PREFILL or s.req is None for s in self.scheduler.running):
                    done, self.finished = done_before + self.finished, []
                    return done
        t0 = time.perf_counter()
        self._decode()
        self.decode_s += time.perf_counter() - t0
        done, self.finished = done_before + self.finished, []
        return done

    def _guarded(self, seq: Sequence, fn) -> None:
        try:
            fn(seq)
        except KvxError as exc:  # a request-level error (e.g. --prefill-chunk with h2o) ends that request only
            seq.error = str(exc)
            self._retire(seq, FAILED)

    # -- prefill ----------------------------------------------------------------------------------
    def _prefill(self, seq: Sequence) -> None:
        """One prefill unit of seq: a piece of its prompt (split_prefill.py) or a chunk (--prefill-chunk),
        and after the last one its compression; or, for a question-agnostic request already compressed,
        its next question."""
        eng = self.engine
        r = seq.request
        if seq.req is None:
            seq.state = PREFILL
            ids = r.context_ids if r.agnostic else r.prompt_ids
            n = len(ids)
            pool, cfg = self.pool, eng.config
            req = eng.new_request(capacity=min(n, eng.prefill_chunk or n), policy=r.policy, budget=r.budget,
                                  cache_factory=lambda cap, track: PagedKVCache(
                                      pool, cfg.num_layers, cfg.num_kv_heads, cap, track_mass=track))
            seq.req = req
            if not req.compresses and not r.agnostic:
                req.cache.reserve(n + seq.max_tokens)
            if eng.prefill_chunk:
                seq.prefill_steps = eng.prefill_steps(req, ids, eng.prefill_chunk)
            else:
                seq.prefill_steps = prefill_pieces(eng, req, ids, self.prefill_step)
        if seq.prefill_steps is not None:
            try:
                next(seq.prefill_steps)  # one chunk or piece; running sequences decode before the next
                return
            except StopIteration as done:
                seq.prefill_steps = None
                self._compress(seq, *done.value)
                return
        self._start_question(seq)

    def _compress(self, seq: Sequence, logits, final_budget) -> None:
        eng, req, r = self.engine, seq.req, seq.request
        if r.agnostic:
            eng.compress(req, headroom=0, budget=final_budget)
            longest = max(len(q) for q in r.question_ids)
            req.cache.reserve(longest + (DECODE_SLACK if req.decode_mode else seq.max_tokens))
            seq.snapshot = ContextSnapshot(req)
            grow = req.cache.blocks_held() if req.decode_mode else 0  # each answer's copy
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
        self._decode_evict([s.req for s in go if s.req.decode_mode and s.req.head_budget is not None])

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
            self.engine._decode_evict(req)
            req.timings.decode_evict_s += time.perf_counter() - te

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
        seq.text += seq.stream.push(tok)
        if r.stop:
            hit = min((i for i in (seq.text.find(s) for s in r.stop) if i >= 0), default=-1)
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
        text = seq.text if finish == "stop" else self.tokenizer.decode(seq.out_ids)
        res = eng.result(req, seq.prompt_tokens, list(seq.out_ids), text, finish)
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


def generate_batch(engine: Engine, requests: list[GenerationRequest], kv_memory: int,
                   max_batch: int = DEFAULT_MAX_BATCH) -> list[list[GenerationResult]]:
    """Run `requests` through one BatchEngine; returns each request's results, in input order."""
    batch = BatchEngine(engine, kv_memory, max_batch)
    seqs = [batch.submit(r) for r in requests]
    batch.run()
    for s in seqs:
        if s.state == FAILED:
            raise KvxError(s.error)
    return [s.results for s in seqs]

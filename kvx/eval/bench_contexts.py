"""`kvx bench --suite contexts`: one document, many questions — what compressing it once buys.

Three ways to answer Q questions about one D-token document, all Q submitted at once to the batched engine
over the same KV memory (so the concurrency is the same):
  (a) every question re-prefills the document with the full cache (a server without a prefix cache);
  (b) every question compresses the document itself, question-aware (what `kvx serve` does with a
      kv_policy: the whole prompt is compressed with its question);
  (c) the document compressed once, question-agnostic (kvzip by default), saved to a .kvc file, loaded,
      and the Q questions sharing its blocks (what /v1/contexts and --load-context do).
Reported per configuration: time to first token (p50, p99, from the submission of all Q), the wall time,
the peak K+V bytes the pool held, and for (c) the compression's time, the file's size and the load's time.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kvx.eval.bench import prose_ids


@dataclass
class ContextsRow:
    config: str
    policy: str
    budget: str | None
    questions: int
    document_tokens: int
    ttft_p50_s: float
    ttft_p99_s: float
    wall_s: float
    peak_kv_bytes: int
    compress_s: float | None = None  # (c): compressing the document once
    file_bytes: int | None = None
    load_s: float | None = None  # (c): reading the file and writing it into the pool

    def to_dict(self) -> dict:
        return asdict(self)


def _percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _question_texts(n: int) -> list[str]:
    topics = ["the main subject", "a date", "a name", "a number", "the first section", "the conclusion",
              "a definition", "an example", "the author", "a warning", "a list", "the last paragraph"]
    return [f"In one sentence, what does the text say about {topics[i % len(topics)]}? ({i + 1})" for i in range(n)]


def _run(batch, requests) -> tuple[list[float], float, int]:
    """Submit every request at once, step to the end: (times to first token, wall, peak pool blocks)."""
    t0 = time.perf_counter()
    seqs = [batch.submit(r) for r in requests]
    peak = batch.pool.num_used
    while batch.has_work:
        batch.step()
        peak = max(peak, batch.pool.num_used)
    wall = time.perf_counter() - t0
    bad = [s.error for s in seqs if s.error]
    if bad:
        raise RuntimeError(f"a benchmark request failed: {bad[0]}")
    return [(s.first_token_at or time.perf_counter()) - t0 for s in seqs], wall, peak


def run(engine, tokenizer, document_tokens: int = 4096, questions: int = 16, gen: int = 16,
        aware_policy: str = "snapkv", context_policy: str = "kvzip", budget: str = "10%", progress=None) -> list[ContextsRow]:
    from kvx.context_options import context_info
    from kvx.options import policy_and_budget, split_context_question
    from kvx.runtime.contexts.context_file import load_context, save_context, weights_of
    from kvx.runtime.contexts.resident import ResidentContext
    from kvx.runtime.contexts.run import compress_context
    from kvx.runtime.engine.batch_engine import BatchEngine
    from kvx.runtime.engine.sequence import GenerationRequest

    doc = tokenizer.decode(prose_ids(tokenizer, document_tokens))
    texts = _question_texts(questions)
    split = [split_context_question(tokenizer, doc, q, None, False) for q in texts]
    ctx_ids, q_ids = split[0][0], [q for _, q in split]
    cfg = engine.config
    per_token = cfg.num_layers * cfg.num_kv_heads * engine.entry_bytes()
    # The same pool for every configuration: (a)'s Q full caches fit at once (plus a block per segment).
    longest = len(ctx_ids) + max(len(q) for q in q_ids) + gen
    memory = questions * (longest + 64) * per_token

    def batch():
        return BatchEngine(engine, memory, max_batch=questions)

    rows = []

    def report(row):
        rows.append(row)
        if progress is not None:
            progress(row)

    n = len(ctx_ids)
    b = batch()
    reqs = [GenerationRequest(prompt_ids=ctx_ids + q, max_tokens=gen, stop_at_eos=False) for q in q_ids]
    ttft, wall, peak = _run(b, reqs)
    report(ContextsRow("(a) full cache, re-prefilled per question", "full", None, questions, n,
                       statistics.median(ttft), _percentile(ttft, 0.99), wall, peak * b.pool.block_bytes))

    b = batch()
    reqs = []
    for q in q_ids:
        pol, bud = policy_and_budget(aware_policy, budget, None, [])
        reqs.append(GenerationRequest(prompt_ids=ctx_ids + q, max_tokens=gen, policy=pol, budget=bud, stop_at_eos=False))
    ttft, wall, peak = _run(b, reqs)
    report(ContextsRow(f"(b) {aware_policy} {budget} per question", aware_policy, budget, questions, n,
                       statistics.median(ttft), _percentile(ttft, 0.99), wall, peak * b.pool.block_bytes))

    pol, bud = policy_and_budget(context_policy, budget, None, [])
    info = context_info(engine.model, tokenizer, engine.dtype, context_policy, budget, None, [], None, False, n)
    t0 = time.perf_counter()
    stored, _ = compress_context(engine, ctx_ids, info, pol, bud)
    compress_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doc.kvc"
        size = save_context(stored, path)
        b = batch()
        t0 = time.perf_counter()
        loaded = load_context(path, cfg, engine.model.fingerprint, tokenizer.fingerprint, engine.dtype,
                              weights_of(engine.model, engine.dtype))
        ctx = ResidentContext(loaded)
        ctx.reserve(b.pool)
        b.scheduler.contexts.held.append(ctx)
        ctx.load()
        load_s = time.perf_counter() - t0
    reqs = [GenerationRequest(context=ctx, question_ids=[q], max_tokens=gen, stop_at_eos=False) for q in q_ids]
    ttft, wall, peak = _run(b, reqs)
    report(ContextsRow(f"(c) {context_policy} {budget} once, loaded, shared", context_policy, budget, questions, n,
                       statistics.median(ttft), _percentile(ttft, 0.99), wall, peak * b.pool.block_bytes,
                       compress_s, size, load_s))
    return rows

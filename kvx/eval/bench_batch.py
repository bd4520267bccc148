"""`kvx bench --suite batch`: what continuous batching over a compressed cache buys, in one run.

Three configurations over the same requests (N prose prompts of P tokens, G generated tokens each, greedy)
and the same KV memory:
  (a) sequential, full cache: one request at a time, each a batch of one (runtime.batch.generate, what
      `kvx generate` runs);
  (b) batched, full cache: as many as the pool holds;
  (c) batched at the budget (e.g. 5%): the freed memory spent on more concurrent sequences.
Decode throughput is generated tokens over the time spent in decode steps; end to end is generated
tokens over the whole run (prefills included). The capacity rows say how many sequences of a given length
the same memory holds, full and at the budget, from the scheduler's own reservation arithmetic.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from kvx.eval.haystack import filler_ids


@dataclass
class BatchRow:
    config: str
    policy: str
    budget: str | None
    max_batch: int
    requests: int
    prompt_tokens: int
    generated_tokens: int
    decode_tokens_per_s: float
    end_to_end_tokens_per_s: float
    max_running: int
    wall_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def _requests(tokenizer, n: int, prompt_tokens: int, gen: int, policy: str | None, budget: str | None):
    from kvx.options import policy_and_budget
    from kvx.runtime.engine.sequence import GenerationRequest

    base = filler_ids(tokenizer, prompt_tokens + 8 * n)
    out = []
    for i in range(n):
        pol, bud = policy_and_budget(policy or "full", budget, None, [])
        # Each request starts at its own offset: different prompts, the same length.
        out.append(GenerationRequest(prompt_ids=base[8 * i:8 * i + prompt_tokens], max_tokens=gen, policy=pol,
                                     budget=bud, stop_at_eos=False))
    return out


def run_config(engine, tokenizer, name: str, n: int, prompt_tokens: int, gen: int, kv_memory: int,
               max_batch: int, policy: str | None, budget: str | None, progress=None) -> BatchRow:
    from kvx.runtime.engine.batch_engine import BatchEngine

    batch = BatchEngine(engine, kv_memory, max_batch)
    reqs = _requests(tokenizer, n, prompt_tokens, gen, policy, budget)
    t0 = time.perf_counter()
    seqs = [batch.submit(r) for r in reqs]
    while batch.has_work:
        batch.step()
        if progress is not None:
            progress(name, batch)
    wall = time.perf_counter() - t0
    generated = sum(r.generated_tokens for s in seqs for r in s.results)
    return BatchRow(name, policy or "full", budget, max_batch, n, prompt_tokens, generated,
                    generated / batch.decode_s if batch.decode_s else 0.0, generated / wall, batch.max_running, wall)


@dataclass
class CapacityRow:
    context: int
    generated: int
    kv_memory: int
    blocks: int
    policy: str
    budget: str
    full_sequences: int
    compressed_sequences: int

    @property
    def ratio(self) -> float | None:
        return self.compressed_sequences / self.full_sequences if self.full_sequences else None

    def to_dict(self) -> dict:
        return dict(asdict(self), ratio=self.ratio)


def run_sequential(engine, tokenizer, name: str, n: int, prompt_tokens: int, gen: int) -> BatchRow:
    reqs = _requests(tokenizer, n, prompt_tokens, gen, None, None)
    t0 = time.perf_counter()
    from kvx.runtime.engine.batch_engine import generate

    results = [generate(engine, r.prompt_ids, r.params, gen, stop_at_eos=False) for r in reqs]
    wall = time.perf_counter() - t0
    generated = sum(r.generated_tokens for r in results)
    decode_s = sum(r.timings.decode_s for r in results)
    return BatchRow(name, "full", None, 1, n, prompt_tokens, generated, generated / decode_s if decode_s else 0.0,
                    generated / wall, 1, wall)


def capacity(engine, context: int, gen: int, kv_memory: int, policy: str, budget: str) -> CapacityRow:
    """Sequences of `context` prompt tokens (+ gen) the batched engine holds at once in kv_memory, full and
    compressed (memory.pool_capacity: the scheduler's admission arithmetic, as `kvx profile --plan`)."""
    from kvx.policies import parse_budget
    from kvx.runtime.memory import pool_capacity
    from kvx.runtime.cache.pool import BlockPool

    cfg = engine.config
    nbytes = torch.empty((), dtype=engine.dtype).element_size()
    fit_full, fit_compressed = pool_capacity(cfg, context, parse_budget(budget), nbytes, gen, kv_memory)
    blocks = BlockPool.for_memory(kv_memory, cfg.num_kv_heads, cfg.head_dim, engine.dtype, "meta").num_blocks
    return CapacityRow(context, gen, kv_memory, blocks, policy, budget, fit_full, fit_compressed)

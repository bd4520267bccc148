"""Small conveniences for tests that drive the model runner by hand (prefill, compress, decode) instead of
through run_alone: a pool to draw from, and greedy decoding of a prepared request through the engine."""

from __future__ import annotations

from kvx.runtime.engine.batch_engine import BatchEngine
from kvx.runtime.cache.pool import BlockPool
from kvx.runtime.engine.sampling import SamplingParams
from kvx.runtime.engine.sequence import GenerationRequest


def pool_for(engine, tokens: int = 8192, block_size: int = 16) -> BlockPool:
    """A pool that holds two full caches of `tokens` tokens (the CPU allocates K/V pages lazily)."""
    cfg = engine.config
    blocks = 2 * cfg.num_layers * cfg.num_kv_heads * -(-tokens // block_size)
    return BlockPool(blocks, block_size, cfg.head_dim, engine.dtype, engine.device)


def new_request(engine, capacity: int = 0, policy=None, budget=None, pool: BlockPool | None = None):
    return engine.new_request(pool or pool_for(engine), capacity=capacity, policy=policy, budget=budget)


def decode(engine, req, logits, max_tokens: int, params: SamplingParams = SamplingParams(),
           stop_at_eos: bool = True) -> tuple[list[int], str, str]:
    """Decode a prefilled, compressed request through the batched engine, in its own pool, as generation
    does: (token ids, text, finish reason)."""
    batch = BatchEngine(engine, pool=req.cache.pool)
    seq = batch.adopt(req, GenerationRequest(prompt_ids=[0] * req.position, max_tokens=max_tokens, params=params,
                                             stop_at_eos=stop_at_eos), logits)
    batch.run()
    if seq.error:
        raise RuntimeError(seq.error)
    r = seq.results[0]
    return r.token_ids, r.text, r.finish_reason


def run_steps(steps):
    """Drive a prefill generator (ModelRunner.prefill_chunks, split_prefill.prefill_pieces) to its end; returns
    what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value

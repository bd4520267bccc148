"""Admission: which waiting requests may start, given what the shared pool can still promise.

The rule is the simplest honest one: a request reserves, before it starts, the most blocks it can ever
hold, so the pool never overflows and nothing is killed for memory; a request that does not fit waits
(first come, first served: a large request is not starved by small ones behind it). After compression
the reservation shrinks to what the request holds plus what it can still grow by, and the rest is at once
available to the queue.

Worst cases, per (layer, kv head) segment of B-entry blocks, for a prompt (or context) of n tokens:
- full cache: ceil((n + questions + max_tokens) / B);
- compressed: the prefill (ceil(n / B), or ceil((per-head budget + chunk) / B) with chunked prefill), plus,
  while the last layers are still being compacted, what the compressed cache can hold in all:
  ceil((K + S·h) / B) + S over the S segments, K the budget's entries, h the decode headroom.
"""

from __future__ import annotations

from collections import deque

# Tokens a decode-time policy may exceed its budget by (the engine's DECODE_SLACK).
from kvx.runtime.compression.decode_eviction import DECODE_SLACK
from kvx.runtime.contexts.resident import ResidentContexts
from kvx.runtime.engine.sequence import Sequence


def full_blocks(segments: int, block_size: int, tokens: int) -> int:
    """Blocks of `segments` segments holding `tokens` entries each."""
    return segments * -(-tokens // block_size)


def compressed_blocks(segments: int, block_size: int, kept: int, headroom: int) -> int:
    """The most blocks a compressed cache of `kept` entries in all (ragged over the segments) plus
    `headroom` free slots per segment can occupy: each segment wastes less than one block."""
    return -(-(kept + segments * headroom) // block_size) + segments


def _compresses(policy, budget, n: int) -> bool:
    return policy is not None and policy.name != "full" and budget is not None and not budget.keeps_everything(n)


def kept_on_rank(config, n: int, budget, head_adaptive: bool) -> int:
    """The most entries a compression of n tokens keeps on this device's kv heads. On one device (or on a
    rank holding whole replicated heads) the model's K. On a tensor-parallel rank holding `num_kv_heads` of
    the model's `model_kv_heads`: a head-adaptive or model-wide allocation may put up to all K on its heads
    (at most all of its segments' n); any other keeps every head of a layer within one entry of the
    others, so the rank holds its heads' share of K and at most one more entry per segment."""
    local = config.num_kv_heads
    model = config.model_kv_heads or local
    K = budget.total_entries(n, config.num_layers, model)
    S = config.num_layers * local
    if model == local:
        return K
    if head_adaptive:
        return min(K, S * n)
    return min(-(-K * local // model) + S, S * n)


def held_blocks(config, block_size: int, prompt_tokens: int, question_tokens: int, max_tokens: int,
                policy=None, budget=None, agnostic: bool = False) -> int:
    """The most blocks a request holds once its prompt is prefilled and compressed: the full cache with
    its headroom, or the compressed cache (ragged over its segments) with its decode headroom, in two
    copies for an agnostic decode-time policy (each answer evicts inside a copy of the context)."""
    S = config.num_layers * config.num_kv_heads
    n, longest = prompt_tokens, question_tokens
    if not _compresses(policy, budget, n):
        return full_blocks(S, block_size, n + longest + max_tokens)
    headroom = (DECODE_SLACK if policy.decode_mode else max_tokens) + longest
    kept = kept_on_rank(config, n, budget, policy.allocator.head_adaptive)
    return compressed_blocks(S, block_size, kept, headroom) * (2 if agnostic and policy.decode_mode else 1)


def worst_case_blocks(config, block_size: int, prompt_tokens: int, question_tokens: int, max_tokens: int,
                      policy=None, budget=None, agnostic: bool = False, prefill_chunk: int | None = None) -> int:
    """The most blocks a request can hold at any point of its life: the one memory model behind admission
    (Scheduler), the size of a lone request's pool and the memory check before any work starts.

    prompt_tokens: the prompt (or context); question_tokens: the longest question (agnostic mode). A
    compressed request holds its prefill while the compressed cache is being built, so both count."""
    held = held_blocks(config, block_size, prompt_tokens, question_tokens, max_tokens, policy, budget, agnostic)
    n = prompt_tokens
    if not _compresses(policy, budget, n):
        return held
    prefill_tokens = n
    if prefill_chunk and prefill_chunk < n:
        prefill_tokens = min(n, budget.per_head(n) + prefill_chunk)
    return full_blocks(config.num_layers * config.num_kv_heads, block_size, prefill_tokens) + held


def context_extra(seq: Sequence) -> int:
    """Free slots per segment an answer on a compressed context needs: its longest question, then its
    decode headroom (DECODE_SLACK for a policy that evicts while decoding)."""
    r = seq.request
    longest = max((len(q) for q in r.question_ids), default=0)
    policy = r.context.policy if r.context is not None else r.policy
    return longest + (DECODE_SLACK if policy is not None and policy.decode_mode else seq.max_tokens)


def blocks_needed(seq: Sequence, config, block_size: int, prefill_chunk: int | None) -> int:
    """The most blocks `seq` can hold at any point of its life (worst_case_blocks of its request). A request
    on a stored context counts only its own blocks: the context's are the context's (held once)."""
    r = seq.request
    if r.context is not None:
        return r.context.request_blocks(block_size, context_extra(seq))
    ids = r.context_ids if r.agnostic else r.prompt_ids
    longest = max((len(q) for q in r.question_ids), default=0) if r.agnostic else 0
    return worst_case_blocks(config, block_size, len(ids), longest, seq.max_tokens, r.policy, r.budget,
                             r.agnostic, prefill_chunk)


class Scheduler:
    """A waiting queue and a running set over one pool."""

    def __init__(self, pool, config, max_batch: int, prefill_chunk: int | None = None):
        self.pool = pool
        self.contexts = ResidentContexts()  # stored contexts resident in this pool
        self.config = config
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Tensor parallel (runtime/parallel/plan.py): flag -> whether every rank's flag is true.
        self.agree = None

    def need(self, seq: Sequence) -> int:
        return blocks_needed(seq, self.config, self.pool.block_size, self.prefill_chunk)

    def fits_ever(self, seq: Sequence) -> bool:
        return self.need(seq) + self._context_blocks(seq, resident_too=True) <= self.pool.num_blocks

    def _context_blocks(self, seq: Sequence, resident_too: bool = False) -> int:
        """Blocks seq's stored context must bring into the pool (0 when it has none, or it is resident)."""
        ctx = seq.request.context
        if ctx is None or (ctx.resident and not resident_too):
            return 0
        return ctx.blocks(self.pool.block_size)

    def admit(self) -> list[Sequence]:
        """Move waiting requests into the running set while the pool can promise their worst case."""
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            need = self.need(seq)
            ctx = seq.request.context
            fits = self.pool.can_reserve(need + self._context_blocks(seq))
            if not fits:
                # Unused stored contexts give their blocks back before a request waits for them.
                fits = self.contexts.make_room(self.pool, need + self._context_blocks(seq), keep=ctx)
            if self.agree is not None:
                fits = self.agree(fits)  # tensor parallel: only what every rank's pool can promise
            if not fits:
                break
            self.waiting.popleft()
            if ctx is not None:
                self.contexts.admit(ctx, self.pool)  # reserves the context's blocks if not resident
            self.pool.reserve(need)
            seq.reserved = need
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def shrink(self, seq: Sequence, blocks: int) -> None:
        """Lower seq's reservation to `blocks` (what it holds plus what it can still grow by)."""
        if blocks < seq.reserved:
            self.pool.release(seq.reserved - blocks)
            seq.reserved = blocks

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            if seq.request.context is not None:
                self.contexts.finish(seq.request.context)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.reserved:
            self.pool.release(seq.reserved)
            seq.reserved = 0

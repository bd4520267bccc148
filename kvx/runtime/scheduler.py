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
from kvx.runtime.decode_eviction import DECODE_SLACK
from kvx.runtime.sequence import Sequence


def full_blocks(segments: int, block_size: int, tokens: int) -> int:
    """Blocks of `segments` segments holding `tokens` entries each."""
    return segments * -(-tokens // block_size)


def compressed_blocks(segments: int, block_size: int, kept: int, headroom: int) -> int:
    """The most blocks a compressed cache of `kept` entries in all (ragged over the segments) plus
    `headroom` free slots per segment can occupy: each segment wastes less than one block."""
    return -(-(kept + segments * headroom) // block_size) + segments


def blocks_needed(seq: Sequence, config, block_size: int, prefill_chunk: int | None) -> int:
    """The most blocks `seq` can hold at any point of its life."""
    r = seq.request
    L, Hkv = config.num_layers, config.num_kv_heads
    S = L * Hkv
    ids = r.context_ids if r.agnostic else r.prompt_ids
    n = len(ids)
    longest = max((len(q) for q in r.question_ids), default=0) if r.agnostic else 0
    mt = seq.max_tokens
    compresses = (r.policy is not None and r.policy.name != "full" and r.budget is not None
                  and not r.budget.keeps_everything(n))
    if not compresses:
        return full_blocks(S, block_size, n + longest + mt)
    decode_mode = r.policy.decode_mode
    headroom = (DECODE_SLACK if decode_mode else mt) + longest
    prefill_tokens = n
    if prefill_chunk and prefill_chunk < n:
        prefill_tokens = min(n, r.budget.per_head(n) + prefill_chunk)
    compressed = compressed_blocks(S, block_size, r.budget.total_entries(n, L, Hkv), headroom)
    if r.agnostic and decode_mode:
        compressed *= 2  # each answer evicts inside a copy of the compressed context
    return full_blocks(S, block_size, prefill_tokens) + compressed


class Scheduler:
    """A waiting queue and a running set over one pool."""

    def __init__(self, pool, config, max_batch: int, prefill_chunk: int | None = None):
        self.pool = pool
        self.config = config
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def need(self, seq: Sequence) -> int:
        return blocks_needed(seq, self.config, self.pool.block_size, self.prefill_chunk)

    def fits_ever(self, seq: Sequence) -> bool:
        return self.need(seq) <= self.pool.num_blocks

    def admit(self) -> list[Sequence]:
        """Move waiting requests into the running set while the pool can promise their worst case."""
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            need = self.need(seq)
            if not self.pool.can_reserve(need):
                break
            self.waiting.popleft()
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
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.reserved:
            self.pool.release(seq.reserved)
            seq.reserved = 0

"""A stored context in a pool: its blocks held once, however many requests read them.

The context owns a cache of its own in the pool (its kept entries, no headroom) and the reservation for
it. A request on it gets a cache that begins with the context's full blocks, shared read-only, and
continues in blocks of its own (`PagedKVCache.sharing`: the partly filled last block copied, so nothing
the request writes lands in a shared block). A policy that evicts while decoding (h2o, tova, streaming,
ahakv) answers from a private copy instead, exactly as a question-agnostic request does in one run:
eviction ranks and moves entries, and shared entries must not move under the other readers; the copy is
of the compressed context, so it costs what the compressed cache costs, not the full one.

`users` counts the requests admitted on the context; an unused context may give its blocks back when
admission needs them (`ResidentContexts.make_room`) and is loaded again from its host copy (or from its
file, through `reload`) on the next use.
"""

from __future__ import annotations

import time
from typing import Callable

from kvx.runtime.cache.paged_cache import PagedKVCache
from kvx.runtime.cache.pool import BlockPool
from kvx.runtime.contexts.stored import StoredContext, into_pool
from kvx.runtime.engine.state import SequenceState


class ResidentContext:
    def __init__(self, stored: StoredContext, reload: Callable[[], StoredContext] | None = None, name: str = "",
                 share: Callable[[StoredContext], StoredContext] | None = None):
        """`share`: on tensor-parallel rank 0, the part of the whole model's context its kv heads hold
        (runtime/parallel/stored_shards.share_of): the host copy stays the whole model's (the other ranks
        are sent it, a server reports it), the pool holds the share."""
        self.name = name
        self.stored: StoredContext | None = stored  # the host copy (None once dropped: reload() reads it back)
        self.reload = reload
        self.share = share
        mine = share(stored) if share is not None else stored
        self.info = stored.info
        self.tokens = stored.position
        self.lengths = mine.lengths.copy()
        self.position = stored.position
        self.kv_bytes = stored.kv_bytes()
        self.model_lengths = stored.lengths.copy()  # the whole model's (on rank 0 `lengths` is its share's)
        self.policy, self.budget = stored.info.build_policy()
        # What a request needs besides the entries (small), kept so that the host copy may be dropped.
        self._head_budget = mine.head_budget
        self._recent_q = None if mine.recent_q is None else list(mine.recent_q)
        self._lengths_after = mine.lengths_after_compress or mine.lengths.tolist()
        self.pool: BlockPool | None = None
        self.cache: PagedKVCache | None = None
        self.reserved = 0  # blocks reserved in `pool` for the context's own cache
        self.users = 0  # requests admitted on it and not finished
        self.deleted = False  # no new request may use it; unloaded when the last user ends
        self.last_used = time.monotonic()
        self.loads = 0
        self.load_s = 0.0

    # -- in the pool ------------------------------------------------------------------------------
    @property
    def decode_time(self) -> bool:
        """Whether its policy evicts while decoding: its requests answer from a private copy."""
        return self.policy is not None and self.policy.decode_mode is not None

    def blocks(self, block_size: int) -> int:
        return int((-(-self.lengths // block_size)).sum())

    def request_blocks(self, block_size: int, extra: int) -> int:
        """The most blocks a request on this context holds of its own, with `extra` free slots per segment:
        the partial last blocks and the extra (shared), or a private copy, twice when each answer evicts
        inside a copy of it (ContextSnapshot)."""
        if not self.decode_time:
            return int((-(-(self.lengths % block_size + extra) // block_size)).sum())
        copy = int((-(-(self.lengths + extra) // block_size)).sum())
        return copy * 2

    def reserve(self, pool: BlockPool) -> None:
        """Promise the context's blocks in `pool` (admission); `load` fills them."""
        assert self.pool is None or self.pool is pool, "a context is resident in one pool at a time"
        need = self.blocks(pool.block_size)
        pool.reserve(need)
        self.pool, self.reserved = pool, need

    def load(self) -> None:
        """Write the context's entries into its reserved blocks (from the host copy, or reload())."""
        if self.cache is not None:
            return
        t0 = time.perf_counter()
        stored = self.whole()
        self.cache = into_pool(stored if self.share is None else self.share(stored), self.pool)
        self.loads += 1
        self.load_s += time.perf_counter() - t0

    def whole(self) -> StoredContext:
        """The host copy (read back from its file if it was dropped)."""
        return self.stored if self.stored is not None else self.reload()

    def unload(self) -> None:
        """Its blocks and reservation back to the pool (no request may be using it)."""
        assert self.users == 0, "a context in use stays resident"
        if self.cache is not None:
            self.cache.release()
            self.cache = None
        if self.pool is not None:
            self.pool.release(self.reserved)
        self.pool, self.reserved = None, 0

    @property
    def resident(self) -> bool:
        return self.pool is not None

    # -- requests ---------------------------------------------------------------------------------
    def open_request(self, runner, extra: int) -> SequenceState:
        """The state of a request answering from this context, with `extra` free slots per segment."""
        base = self.cache
        cache = PagedKVCache.copy_of(base, base.pool, extra) if self.decode_time else PagedKVCache.sharing(base, extra)
        L = runner.config.num_layers
        req = SequenceState(cache=cache, policy=self.policy, budget=self.budget, stats=[None] * L,
                            recent_q=[None] * L)
        runner._bind(self.policy)
        req.position = self.position
        req.head_budget = None if self._head_budget is None else [list(h) for h in self._head_budget]
        if self._recent_q is not None:
            req.recent_q = [q.to(runner.device) for q in self._recent_q]
        req.lengths_after_compress = [list(r) for r in self._lengths_after]
        return req


class ResidentContexts:
    """The stored contexts resident in one pool, for admission to make room among the unused ones."""

    def __init__(self):
        self.held: list[ResidentContext] = []

    def admit(self, ctx: ResidentContext, pool: BlockPool) -> None:
        if ctx.resident and ctx.pool is not pool:
            raise RuntimeError("a stored context is resident in another pool; one pool at a time")
        if not ctx.resident:
            ctx.reserve(pool)
            self.held.append(ctx)
        ctx.users += 1
        ctx.last_used = time.monotonic()

    def finish(self, ctx: ResidentContext) -> None:
        ctx.users -= 1
        ctx.last_used = time.monotonic()
        if ctx.deleted and ctx.users == 0:
            self.drop(ctx)

    def drop(self, ctx: ResidentContext) -> None:
        """Give back an unused context's blocks now."""
        if ctx.users == 0 and ctx.resident:
            ctx.unload()
            self.held.remove(ctx)

    def make_room(self, pool: BlockPool, blocks: int, keep: ResidentContext | None = None) -> bool:
        """Unload unused contexts, least recently used first, until `blocks` can be reserved."""
        for ctx in sorted((c for c in self.held if c.users == 0 and c is not keep), key=lambda c: c.last_used):
            if pool.can_reserve(blocks):
                break
            self.drop(ctx)
        return pool.can_reserve(blocks)

    def blocks_held(self) -> int:
        return sum(c.reserved for c in self.held)

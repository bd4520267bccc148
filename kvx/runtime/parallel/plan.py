"""Rank 0 decides, the other ranks follow: many requests over tensor-parallel ranks (--jsonl, kvx serve).

Rank 0's BatchEngine is wrapped in a `LeaderBatch`: what it is asked between two steps (a request
submitted, a sequence cancelled, a stored context deleted) is sent to the other ranks with the step (one broadcast of the step's
plan), and `follow()` on every other rank applies it to its own BatchEngine and runs the same step. The
ranks' engines thus see the same requests in the same order at the same steps; the tokens are rank 0's
(BatchEngine._agree_tokens), and a request is admitted only when every rank's pool can promise its share
(Scheduler.agree: one all-reduce per admission), since a compressed request may hold more blocks on one
rank than on another (Ada-KV, LaProx). The ranks' pools have the same size (the smallest rank's).

A request on a stored context sends its context once (the whole model's kept entries, with the first
request on it; each rank holds its share, in its pool as a ResidentContext of its own) and then only its
number. A request that compresses and keeps a context (`store`) runs on every rank; its entries are gathered
on rank 0 when it ends (BatchEngine._compress).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvx.errors import KvxError

STOP = "stop"
_POOL_KEYS = ("blocks_total", "blocks_used", "blocks_free", "blocks_reserved", "bytes_total", "bytes_used")


def rank_pools(batch, tp) -> list[dict]:
    """Every rank's pool figures (one all-gather; every rank calls it at the same point)."""
    import torch

    s = batch.pool.stats()
    mine = torch.tensor([s[k] for k in _POOL_KEYS], dtype=torch.long, device=tp.device)
    return [dict(zip(_POOL_KEYS, t.tolist())) for t in tp.all_gather(mine)]


def check_batchable(model) -> None:
    """Rank 0 alone decides whether a request can ever run (BatchEngine.submit: its worst case against the
    whole pool), so it must be the rank that needs the most blocks: every rank's pool has the same number of
    blocks, and a request's worst case is the same per (layer, kv head) on every rank, so that is the rank
    holding the most kv heads — rank 0 by models/sharding.shard_for (3 kv heads on 2 ranks: 2 and 1)."""
    from kvx.models.sharding import shard_for

    shards = [shard_for(model.full_config, r, model.tp.world) for r in range(model.tp.world)]
    if max(s.kv_heads for s in shards) != shards[0].kv_heads:
        raise KvxError("tensor parallel: rank 0 must hold the most kv heads to schedule for every rank")


@dataclass
class ContextRef:
    """A stored context as the other ranks receive it: its number, and the whole model's kept entries the
    first time it is sent (each rank then holds its own share of them, runtime/parallel/stored_shards.py)."""

    key: int
    stored: object | None = None


def portable(request, context=None):
    """The request as the other ranks receive it: no callback (rank 0 streams), no caller's id (a server's
    job), its stored context as a ContextRef."""
    return replace(request, on_text=None, id=None, context=context)


class LeaderBatch:
    """Rank 0's BatchEngine; every submit and cancel reaches the other ranks with the next step."""

    def __init__(self, batch, tp, fatal: bool = False):
        check_batchable(batch.engine.model)
        self.batch, self.tp = batch, tp
        # A step that raises leaves the ranks apart: with `fatal` (a server, whose engine thread would go on)
        # the process ends with one line (the other ranks then exit too), else the error propagates.
        self.fatal = fatal
        batch.scheduler.agree = tp.agree
        self._ops: list = []
        self._index: dict[int, int] = {}  # id(seq) -> its number on every rank, while it lives
        self._next = 0
        # Stored contexts the other ranks hold, by number (rank 0's ResidentContext kept alive with it, so
        # its id stays its own); one deleted on rank 0 is forgotten on the others with the next step.
        self._contexts: dict[int, object] = {}
        self._context_keys: dict[int, int] = {}  # id(ResidentContext) -> its number
        self._next_context = 0  # numbers are never reused
        self.ranks = rank_pools(batch, tp)  # every rank's pool, as of the last step (kvx serve's /metrics)

    def stats(self) -> dict:
        return {**self.batch.stats(), "ranks": self.ranks}

    def __getattr__(self, name):  # pool, scheduler, stats(), has_work, engine, ...
        return getattr(self.batch, name)

    @property
    def finished(self):
        return self.batch.finished

    @finished.setter
    def finished(self, value) -> None:
        self.batch.finished = value

    def submit(self, request):
        ctx = request.context
        key = None if ctx is None else self._context_keys.get(id(ctx))
        seq = self.batch.submit(request)  # a refusal (KvxError) is rank 0's alone: nothing is sent
        ref = None
        if ctx is not None:
            if key is None:  # the first request on it: the others get its entries
                key, self._next_context = self._next_context, self._next_context + 1
                self._contexts[key], self._context_keys[id(ctx)] = ctx, key
                ref = ContextRef(key, ctx.whole())
            else:
                ref = ContextRef(key)
        self._index[id(seq)] = self._next
        self._next += 1
        self._ops.append(("submit", portable(request, ref)))
        return seq

    def _forget_deleted(self) -> None:
        for key, ctx in list(self._contexts.items()):
            if ctx.deleted:
                self._ops.append(("forget", key))
                del self._contexts[key], self._context_keys[id(ctx)]

    def cancel(self, seq) -> None:
        number = self._index.get(id(seq))
        if number is not None and not seq.done:
            self._ops.append(("cancel", number))
        self.batch.cancel(seq)

    def step(self):
        self._forget_deleted()
        ops, self._ops = self._ops, []
        try:
            self.tp.send_plan(ops)
            done = self.batch.step()
            self.ranks = rank_pools(self.batch, self.tp)
        except BaseException as exc:
            if not self.fatal:
                raise
            import os
            import sys

            from kvx.runtime.parallel.launch import describe

            print(f"kvx: error: tensor-parallel rank 0 failed in a step: {describe(exc)}; the run was stopped",
                  file=sys.stderr, flush=True)
            os._exit(1)
        for seq in done:
            self._index.pop(id(seq), None)
        return done

    def run(self):
        done = []
        while self.has_work:
            done += self.step()
        done += self.batch.finished
        self.batch.finished = []
        return done

    def close(self) -> None:
        """The other ranks' follow() returns."""
        self.tp.send_plan(STOP)


def follow(batch, tp) -> None:
    """Another rank than 0: run rank 0's steps on this rank's BatchEngine until rank 0 closes."""
    check_batchable(batch.engine.model)
    batch.scheduler.agree = tp.agree
    rank_pools(batch, tp)  # as LeaderBatch does when it starts, and after every step
    from kvx.runtime.contexts.resident import ResidentContext
    from kvx.runtime.parallel.stored_shards import share_of

    seqs: dict[int, object] = {}  # rank 0's number -> the sequence, while it lives
    numbers: dict[int, int] = {}  # id(sequence) -> its number
    contexts: dict[int, ResidentContext] = {}  # rank 0's stored contexts, this rank's share of each
    share = share_of(batch.engine.model)
    count = 0
    while True:
        ops = tp.recv_plan()
        if ops == STOP:
            return
        for kind, arg in ops:
            if kind == "submit":
                ref = arg.context
                if ref is not None:
                    if ref.stored is not None:
                        contexts[ref.key] = ResidentContext(share(ref.stored))
                    arg = replace(arg, context=contexts[ref.key])
                seq = batch.submit(arg)
                seqs[count], numbers[id(seq)] = seq, count
                count += 1
            elif kind == "forget":
                ctx = contexts.pop(arg, None)
                if ctx is not None:  # its blocks back now, or when its last request ends
                    ctx.deleted = True
                    batch.scheduler.contexts.drop(ctx)
            elif arg in seqs:
                batch.cancel(seqs[arg])
        for seq in batch.step():
            seqs.pop(numbers.pop(id(seq), -1), None)
        rank_pools(batch, tp)

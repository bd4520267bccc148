"""One prefill serving many (policy, budget) pairs, with each pair's statistics exactly as its own prefill.

Merging every policy's StatsRequest (StatsRequest.merge) is not enough: the window statistics (col_sum,
col_sq) are sums over the last `window` query rows, so policies with different windows need different
sums, and AhaKV's step-gain column sums depend on the per-head budget (sg_budget), so they differ per
budget. Fortunately almost every statistic only needs the *last* query rows and the keys/values:

- window sums, squares, the last row and AhaKV's step-gain sums use the last max(window, sg_rows) rows;
- key, value and output-projected value norms use the keys and values alone;
- KVzip's reconstruction passes read the context's cache and its token ids (kept here), nothing else.

Only H2O's column sums over all rows and ExpectedAttention's query moments need every query row. So the
prefill computes just those (the union over policies: both are independent of the budget), and records
the last R query rows of every layer (R: the largest window any pair needs). After the prefill, every
distinct StatsRequest is computed from those rows and the cached keys with the same function the engine
uses during prefill (kernels.stats.compute_layer_stats), which therefore sees the very same rows and keys.
The result equals the stand-alone prefill up to float summation order. The recorded rows also seed
AhaKV's decode-time recent queries, as its own prefill would.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor

from kvx.kernels.stats import LayerStats, StatsRequest, compute_layer_stats
from kvx.runtime.cache.pool import DEFAULT_BLOCK_SIZE, BlockPool


class SharedPrefill:
    """Prefill `ids` once; fork() hands out requests ready for engine.compress(req, headroom, pool=...), one
    per (policy, budget)."""

    def __init__(self, engine, ids: list[int], pairs: list[tuple[object, object]]):
        self.engine = engine
        self.n = len(ids)
        self.ids = list(ids)
        engine.check_length(self.n)
        self._requests = {self._key(p, b): self._request_of(p, b) for p, b in pairs}
        wanted = [r for r in self._requests.values() if r is not None]
        all_rows = StatsRequest(colsum_all=any(r.colsum_all for r in wanted),
                                query_moments=any(r.query_moments for r in wanted))
        self._tail_rows = max([1] + [_tail_rows(r) for r in wanted] +
                              [p.window for p, b in pairs if _recent_queries(p, b)])
        L = engine.config.num_layers
        self._q_tail: list[Tensor | None] = [None] * L
        self._q_pre_tail: list[Tensor | None] = [None] * L
        self._tail_positions: Tensor | None = None

        # The base cache lives in a pool of its own, exactly its size: every variant is compressed from it
        # into the pool that answers (ModelRunner.compress(pool=...)), copying only what it keeps.
        cfg = engine.config
        segments = cfg.num_layers * cfg.num_kv_heads
        self.pool = BlockPool(segments * -(-self.n // DEFAULT_BLOCK_SIZE), DEFAULT_BLOCK_SIZE, cfg.head_dim,
                              engine.dtype, engine.device)
        self.base = engine.new_request(self.pool, capacity=self.n)
        self.logits = engine.prefill(self.base, ids,
                                     stats_req=all_rows if (all_rows.colsum_all or all_rows.query_moments) else None,
                                     wrap=self._capture)
        self._stats: dict[StatsRequest, tuple[list[LayerStats], float]] = {}

    # -- prefill hook -----------------------------------------------------------------------------
    def _capture(self, attend: Callable) -> Callable:
        """Record the last R query rows of every layer (the per-pair statistics are computed from them)."""
        R = self._tail_rows

        def capture(layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, q_pre: Tensor) -> Tensor:
            self._q_tail[layer] = q[:, -R:].clone()
            self._q_pre_tail[layer] = q_pre[:, -R:].clone()
            self._tail_positions = positions[-R:].clone()
            return attend(layer, q, k, v, positions, q_pre)

        return capture

    # -- per-pair statistics ----------------------------------------------------------------------
    @staticmethod
    def _key(policy, budget) -> tuple:
        return (id(policy), str(budget))

    def _request_of(self, policy, budget) -> StatsRequest | None:
        if policy is None or policy.name == "full" or budget is None or budget.keeps_everything(self.n):
            return None
        return policy.request_for(budget, self.n)

    def stats_for(self, request: StatsRequest) -> tuple[list[LayerStats], float]:
        """Every layer's statistics for `request` (cached), and the seconds it took to compute them."""
        if request not in self._stats:
            t0 = time.perf_counter()
            stats = self._compute(request)
            self._stats[request] = (stats, time.perf_counter() - t0)
        return self._stats[request]

    @torch.inference_mode()
    def _compute(self, request: StatsRequest) -> list[LayerStats]:
        engine, cfg = self.engine, self.engine.config
        tail_request = replace(request, colsum_all=False, query_moments=False)
        out = []
        for layer, lc in enumerate(self.base.cache.layers):
            K, V, P = lc.dense()
            st = compute_layer_stats(
                tail_request, self._q_tail[layer], K, V, self._tail_positions, P, engine.scale,
                cfg.sliding_window_for(layer), self._q_pre_tail[layer],
                gram=engine._gram(layer) if tail_request.value_out_norm else None,
                o_proj_weight=engine.model.o_proj_weight(layer) if tail_request.value_out_l1 else None)
            full = self.base.stats[layer]
            if request.colsum_all:
                st.colsum_all, st.colsum_count = full.colsum_all, full.colsum_count
            if request.query_moments:
                st.q_mean, st.q_cov = full.q_mean, full.q_cov
            out.append(st)
        if request.reconstruction:
            # KVzip: reconstruction passes over the base request's context (read only; budget-independent,
            # so every budget of the same kvzip options shares them through the cache above).
            from kvx.runtime.compression.reconstruction import reconstruction_stats

            saved = self.base.timings.stats_s
            out = reconstruction_stats(engine, self.base, self.ids, out, request)
            self.base.timings.stats_s = saved
        return out

    # -- forks ------------------------------------------------------------------------------------
    def fork(self, policy=None, budget=None):
        """A request over the shared prefill for (policy, budget), its statistics in place: compress it into
        a pool (engine.compress(req, headroom, pool=...)) before it runs anything."""
        engine = self.engine
        req = engine.fork(self.base, policy, budget)
        key = self._key(policy, budget)
        request = self._requests[key] if key in self._requests else self._request_of(policy, budget)
        if request is None:
            req.stats = [None] * engine.config.num_layers
        else:
            stats, seconds = self.stats_for(request)
            req.stats = list(stats)
            req.timings.stats_s += seconds
        if _recent_queries(policy, budget):
            req.recent_q = [None if q is None else q[:, -policy.window:].clone() for q in self._q_tail]
        return req


def _tail_rows(request: StatsRequest) -> int:
    return max(request.window, request.sg_rows, 1 if request.last_row else 0)


def _recent_queries(policy, budget) -> bool:
    return (policy is not None and policy.name != "full" and budget is not None
            and policy.decode_mode == "recent_queries")

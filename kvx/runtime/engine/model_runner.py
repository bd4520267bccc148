"""The model runner: one forward pass of the model over a request's paged cache, and what it computes on
the way (statistics, compression).

The runner owns no cache and runs no loop: the batched engine (runtime/engine/batch_engine.py) decides what runs when,
and the runner executes one unit of it for one request. Prefill runs the model over the prompt with an
`attend` callback (runtime/engine/attend.py) that appends K/V to the request's PagedKVCache, attends and (when a
policy asks) records that layer's statistics; the policy then picks what each (layer, kv head) keeps and
the cache is compacted in place (runtime/compression/compress.py), so the blocks held really shrink. Decode steps
of many requests at once run through runtime/engine/batch_step.py, which calls the same model.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from kvx.errors import KvxError
from kvx.kernels.stats import StatsRequest, wo_gram
from kvx.models.cpu_weights import describe
from kvx.runtime.engine.attend import make_attend
from kvx.runtime.compression.chunked_prefill import prefill_chunks
from kvx.runtime.compression.compress import compress
from kvx.runtime.cache.paged_cache import PagedKVCache
from kvx.runtime.engine.state import GenerationResult, SequenceState, Timings
from kvx.runtime.parallel.totals import whole_model

__all__ = ["ModelRunner", "GenerationResult", "SequenceState", "Timings"]

# A forward pass's attend callback may be wrapped by its caller (eval's shared prefill records the last
# query rows, fidelity runs a shadow cache beside the full one): wrap(attend) -> attend.
AttendWrap = Callable[[Callable], Callable]


class ModelRunner:
    """The model runner: forward passes, statistics and compression over paged caches.

    `policy`/`budget`/`prefill_chunk` are the defaults a command line gives every request."""

    def __init__(self, model, tokenizer, policy=None, budget=None, use_graphs: bool = True,
                 prefill_chunk: int | None = None):
        self.model = model
        self.prefill_chunk = prefill_chunk  # chunked prefill with interleaved eviction (chunked_prefill.py)
        self.use_graphs = use_graphs  # CUDA-graph decode steps on a GPU (runtime/engine/batch_step.py)
        self.tokenizer = tokenizer
        self.config = model.config
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        self.policy = policy
        self.budget = budget
        cfg = self.config
        self.scale = cfg.head_dim ** -0.5
        self.group = cfg.num_heads // cfg.num_kv_heads
        self._grams: dict[int, Tensor] = {}

    # -- helpers ----------------------------------------------------------------------------------
    def _gram(self, layer: int) -> Tensor:
        if layer not in self._grams:
            self._grams[layer] = wo_gram(self.model.o_proj_weight(layer).float(), self.config.num_heads,
                                         self.config.head_dim)
        return self._grams[layer]

    def _bind(self, policy) -> None:
        """Tell a policy the model's shapes (rotary frequencies, heads) before it scores anything."""
        if policy is not None:
            cfg = self.config
            policy.set_model_info(inv_freq=getattr(self.model, "inv_freq", None), num_heads=cfg.num_heads,
                                  head_dim=cfg.head_dim, rope_theta=cfg.rope_theta)

    def entry_bytes(self) -> int:
        """Bytes of one (layer, kv head, token) entry: K and V."""
        return 2 * self.config.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def new_request(self, pool, capacity: int = 0, policy=None, budget=None) -> SequenceState:
        """A fresh request whose cache draws from `pool` (a BlockPool), with room for `capacity` tokens
        per (layer, kv head)."""
        cfg = self.config
        req = SequenceState(cache=None, policy=policy, budget=budget, stats=[None] * cfg.num_layers,
                      recent_q=[None] * cfg.num_layers)
        self._bind(policy)
        track = req.decode_mode in ("accumulate", "last")
        req.cache = PagedKVCache(pool, cfg.num_layers, cfg.num_kv_heads, capacity, track_mass=track)
        return req

    def stats_request(self, req: SequenceState, n_tokens: int) -> StatsRequest | None:
        """What the attention must emit for this request's policy over an n_tokens prefill."""
        if not req.compresses or req.budget.keeps_everything(n_tokens):
            return None
        return req.policy.request_for(req.budget, n_tokens)

    def check_length(self, n_prompt: int) -> None:
        limit = self.config.max_position_embeddings
        if n_prompt == 0:
            raise KvxError("the prompt is empty")
        if n_prompt >= limit:
            raise KvxError(f"the prompt has {n_prompt} tokens; the model's context is {limit} tokens")

    # -- the forward pass -------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, req: SequenceState, ids: list[int], stats_req: StatsRequest | None = None,
                wrap: AttendWrap | None = None) -> Tensor:
        """Run `ids` through the model at the request's next positions; returns the last logits [V]."""
        T = len(ids)
        req.cache.make_room(T, headroom=0)
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
        positions = torch.arange(req.position, req.position + T, device=self.device)
        attend = make_attend(self, req, stats_req)
        if wrap is not None:
            attend = wrap(attend)
        logits = self.model(ids_t, positions, attend, last_only=True)
        req.position += T
        return logits[-1]

    def prefill(self, req: SequenceState, ids: list[int], stats_req: StatsRequest | None = None,
                context_ids: list[int] | None = None, wrap: AttendWrap | None = None) -> Tensor:
        """Prefill `ids`, recording the statistics the request's policy needs (or `stats_req`).

        context_ids: the whole prompt when `ids` is only its last piece (a split prefill: the cache already
        holds the rest), for KVzip's reconstruction passes."""
        if stats_req is None:
            stats_req = self.stats_request(req, len(ids))
        t0 = time.perf_counter()
        logits = self.forward(req, ids, stats_req, wrap)
        if stats_req is not None and stats_req.reconstruction:
            # KVzip: reconstruction passes score the context (their own K/V never enter the cache).
            from kvx.runtime.compression.reconstruction import reconstruction_stats
            req.stats = reconstruction_stats(self, req, context_ids or ids, req.stats, stats_req)
        req.timings.prefill_s += time.perf_counter() - t0
        return logits

    def prefill_chunks(self, req: SequenceState, ids: list[int], chunk: int):
        """A generator prefilling `chunk` tokens per step with eviction in between
        (runtime/compression/chunked_prefill.py); returns (last logits, the budget for the final compress)."""
        return prefill_chunks(self, req, ids, chunk)

    def fork(self, req: SequenceState, policy=None, budget=None) -> SequenceState:
        """A request over req's prefilled cache and statistics (shared, read only) for another (policy,
        budget): compress it with `pool=` to give it a cache of its own (only the kept entries are copied).
        This is how one prefill serves many (policy, budget) pairs in `kvx eval`."""
        new = SequenceState(cache=req.cache, policy=policy, budget=budget, stats=list(req.stats),
                      recent_q=list(req.recent_q))
        self._bind(policy)
        new.position = req.position
        new.timings = Timings(prefill_s=req.timings.prefill_s, stats_s=req.timings.stats_s)
        return new

    # -- compression ------------------------------------------------------------------------------
    def compress(self, req: SequenceState, headroom: int, budget=None, pool=None) -> None:
        """Select with the policy from the statistics of the last prefill, then compact the cache
        (runtime/compression/compress.py). `budget` overrides the request's (chunked prefill passes the per-head
        equivalent); `pool` writes the kept entries to a new cache there (a fork)."""
        compress(self, req, headroom, budget, pool)

    # -- results -----------------------------------------------------------------------------------
    def result(self, req: SequenceState, prompt_tokens: int, out_ids, text, finish) -> GenerationResult:
        cfg = self.config
        n_total = req.position
        entries_full = cfg.num_layers * (cfg.model_kv_heads or cfg.num_kv_heads) * n_total
        # A request on a stored context reads the context's shared blocks too: they are part of its cache. On
        # tensor-parallel ranks: the whole model's figures, every rank's heads (runtime/parallel/totals.py).
        held, peak, kept = whole_model(self.model, [
            req.cache.bytes_allocated() + req.cache.shared_bytes(),
            max(req.cache.peak_bytes, req.cache.bytes_allocated()) + req.cache.shared_bytes(),
            req.cache.total_entries()])
        return GenerationResult(
            text=text, token_ids=out_ids, prompt_tokens=prompt_tokens, generated_tokens=len(out_ids),
            finish_reason=finish, timings=req.timings,
            kv_bytes_full=entries_full * self.entry_bytes(),
            kv_bytes_held=held, kv_bytes_peak=peak, kv_entries_kept=kept, kv_entries_full=entries_full,
            policy=req.policy.name if req.compresses else "full",
            budget=None if req.budget is None else str(req.budget),
            lengths=req.lengths_after_compress, weights=describe(self.model),
        )

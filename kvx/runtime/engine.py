"""Prefill, compress, decode: one request at a time, over a cache of its own.

The engine owns one RaggedKVCache per request (or a PagedKVCache from the batched engine's pool). Prefill
runs the model over the prompt with an `attend` callback (runtime/attend.py) that appends K/V to the
cache, attends, and (when a policy asks) records that layer's statistics. The policy then picks what each
(layer, kv head) keeps and the cache is compacted (runtime/compression.py), so the bytes held really
shrink. Decoding appends one token per step; policies with a decode mode keep the cache at its budget
while generating (runtime/decode_eviction.py). Long prompts can be prefilled in chunks with eviction in
between (runtime/chunked_prefill.py).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from kvx.errors import KvxError
from kvx.kernels.stats import StatsRequest, wo_gram
from kvx.runtime.attend import make_attend
from kvx.runtime.cache import RaggedKVCache
from kvx.runtime.chunked_prefill import prefill_steps
from kvx.runtime.compression import compress
from kvx.runtime.decode_eviction import DECODE_SLACK, decode_evict
from kvx.runtime.graphs import DecodeGraph, graphs_supported
from kvx.runtime.request import GenerationResult, Request, Timings
from kvx.runtime.sampling import SamplingParams, make_generator, sample
from kvx.runtime.snapshot import ContextSnapshot

__all__ = ["DECODE_SLACK", "Engine", "GenerationResult", "Request", "Timings"]


class Engine:
    """Runs a model with a ragged KV cache. `policy`/`budget` are the defaults for generate()."""

    def __init__(self, model, tokenizer, policy=None, budget=None, use_graphs: bool = True,
                 prefill_chunk: int | None = None):
        self.model = model
        self.prefill_chunk = prefill_chunk  # chunked prefill with interleaved eviction (see prefill_chunked)
        self.use_graphs = use_graphs  # CUDA-graph decode where supported (see runtime/graphs.py)
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

    def entry_bytes(self) -> int:
        """Bytes of one (layer, kv head, token) entry: K and V."""
        return 2 * self.config.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def new_request(self, capacity: int, policy=None, budget=None, cache_factory=None) -> Request:
        """A fresh request; `cache_factory(capacity, track_mass)` builds its cache (default: a RaggedKVCache
        of its own; the batched engine passes one drawing from its shared pool)."""
        cfg = self.config
        req = Request(cache=None, policy=policy, budget=budget, stats=[None] * cfg.num_layers,
                      recent_q=[None] * cfg.num_layers)
        if policy is not None:
            policy.set_model_info(inv_freq=getattr(self.model, "inv_freq", None), num_heads=cfg.num_heads,
                                  head_dim=cfg.head_dim, rope_theta=cfg.rope_theta)
        track = req.decode_mode in ("accumulate", "last")
        if cache_factory is not None:
            req.cache = cache_factory(capacity, track)
        else:
            req.cache = RaggedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device,
                                      capacity, track_mass=track)
        return req

    def stats_request(self, req: Request, n_tokens: int) -> StatsRequest | None:
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
    def _attend_fn(self, req: Request, stats_req: StatsRequest | None) -> Callable:
        return make_attend(self, req, stats_req)

    @torch.inference_mode()
    def forward(self, req: Request, ids: list[int], stats_req: StatsRequest | None = None) -> Tensor:
        """Run `ids` through the model at the request's next positions; returns the last logits [V]."""
        T = len(ids)
        req.cache.reserve(T, headroom=0)
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
        positions = torch.arange(req.position, req.position + T, device=self.device)
        logits = self.model(ids_t, positions, self._attend_fn(req, stats_req), last_only=True)
        req.position += T
        return logits[-1]

    def prefill(self, req: Request, ids: list[int], stats_req: StatsRequest | None = None,
                context_ids: list[int] | None = None) -> Tensor:
        """Prefill `ids`, recording the statistics the request's policy needs (or `stats_req`).

        context_ids: the whole prompt when `ids` is only its last piece (a split prefill: the cache already
        holds the rest), for KVzip's reconstruction passes."""
        if stats_req is None:
            stats_req = self.stats_request(req, len(ids))
        t0 = time.perf_counter()
        logits = self.forward(req, ids, stats_req)
        if stats_req is not None and stats_req.reconstruction:
            # KVzip: reconstruction passes score the context (their own K/V never enter the cache).
            from kvx.runtime.reconstruction import reconstruction_stats
            req.stats = reconstruction_stats(self, req, context_ids or ids, req.stats, stats_req)
        req.timings.prefill_s += time.perf_counter() - t0
        return logits

    def prefill_chunked(self, req: Request, ids: list[int], chunk: int):
        """Prefill in chunks of `chunk` tokens, evicting after each one, so the cache never holds much more
        than the budget plus one chunk (instead of the whole prompt).

        Between chunks the policy's scorer keeps the per-head budget uniformly in every head (statistics
        are taken over that chunk's queries); the final selection after the last chunk uses the policy's
        own allocator over the survivors. Returns (last logits, the budget for that final compress):
        a per-head token budget equal to what the original budget means for the whole prompt.
        """
        steps = self.prefill_steps(req, ids, chunk)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def prefill_steps(self, req: Request, ids: list[int], chunk: int):
        """prefill_chunked one chunk at a time (runtime/chunked_prefill.py)."""
        return prefill_steps(self, req, ids, chunk)

    def fork(self, req: Request, policy=None, budget=None) -> Request:
        """A copy of a prefilled request (cache cloned, statistics shared read-only) to compress differently.

        This is how one prefill serves many (policy, budget) pairs in `kvx eval`.
        """
        new = self.new_request(capacity=1, policy=policy, budget=budget)
        new.cache = req.cache.clone(track_mass=new.decode_mode in ("accumulate", "last"))
        new.position = req.position
        new.stats = list(req.stats)
        new.recent_q = list(req.recent_q)
        new.timings = Timings(prefill_s=req.timings.prefill_s, stats_s=req.timings.stats_s)
        return new

    # -- compression ------------------------------------------------------------------------------
    def compress(self, req: Request, headroom: int, budget=None) -> None:
        """Select with the policy from the statistics of the last prefill, then compact the cache
        (runtime/compression.py). `budget` overrides the request's (chunked prefill passes the per-head
        equivalent)."""
        compress(self, req, headroom, budget)

    def _decode_evict(self, req: Request) -> None:
        """Bring every (layer, kv head) back to its budget once it exceeds it by DECODE_SLACK."""
        decode_evict(self, req)

    # -- generation -------------------------------------------------------------------------------
    def decode(self, req: Request, logits: Tensor, params: SamplingParams, max_tokens: int,
               on_text: Callable[[str], None] | None = None, stop_at_eos: bool = True) -> tuple[list[int], str, str]:
        """Sample up to max_tokens from `logits` on; returns (token ids, text, finish reason)."""
        eos = set(self.tokenizer.eos_token_ids) if stop_at_eos else set()
        gen = make_generator(params, torch.device("cpu"))
        out_ids: list[int] = []
        stream = self.tokenizer.stream_decoder() if on_text is not None else None
        finish = "length"
        limit = self.config.max_position_embeddings
        graph = None
        if self.use_graphs and graphs_supported(self, req):
            graph = req.graph = req.graph or DecodeGraph(self, req)  # kept: later decodes replay it
        t0 = time.perf_counter()
        for _ in range(max_tokens):
            tok = sample(logits, params, gen)
            if tok in eos:
                finish = "eos"
                break
            out_ids.append(tok)
            if stream is not None:
                piece = stream.push(tok)
                if piece:
                    on_text(piece)
            if len(out_ids) == max_tokens or req.position >= limit:
                break
            logits = graph.step(tok) if graph is not None else self.forward(req, [tok])
            if req.decode_mode and req.head_budget is not None:
                te = time.perf_counter()
                self._decode_evict(req)
                req.timings.decode_evict_s += time.perf_counter() - te
        req.timings.decode_s += time.perf_counter() - t0
        text = self.tokenizer.decode(out_ids)
        if stream is not None:
            rest = stream.flush()
            if rest:
                on_text(rest)
        return out_ids, text, finish

    def result(self, req: Request, prompt_tokens: int, out_ids, text, finish) -> GenerationResult:
        cfg = self.config
        n_total = req.position
        entries_full = cfg.num_layers * cfg.num_kv_heads * n_total
        return GenerationResult(
            text=text, token_ids=out_ids, prompt_tokens=prompt_tokens, generated_tokens=len(out_ids),
            finish_reason=finish, timings=req.timings,
            kv_bytes_full=entries_full * self.entry_bytes(),
            kv_bytes_held=req.cache.bytes_allocated(), kv_bytes_peak=req.cache.peak_bytes,
            kv_entries_kept=req.cache.total_entries(), kv_entries_full=entries_full,
            policy=req.policy.name if req.compresses else "full",
            budget=None if req.budget is None else str(req.budget),
            lengths=req.lengths_after_compress,
        )

    def generate(self, prompt_ids: list[int], params: SamplingParams = SamplingParams(), max_tokens: int = 256,
                 on_text: Callable[[str], None] | None = None, policy=None, budget=None,
                 stop_at_eos: bool = True) -> GenerationResult:
        """Question-aware: prefill the whole prompt, compress, decode."""
        policy = policy or self.policy
        budget = budget or self.budget
        n = len(prompt_ids)
        self.check_length(n)
        max_tokens = max(0, min(max_tokens, self.config.max_position_embeddings - n))
        req = self.new_request(capacity=min(n, self.prefill_chunk or n), policy=policy, budget=budget)
        if not req.compresses:
            req.cache.reserve(n + max_tokens)
        logits, final_budget = self._prefill_prompt(req, prompt_ids)
        self.compress(req, headroom=max_tokens, budget=final_budget)
        out_ids, text, finish = self.decode(req, logits, params, max_tokens, on_text, stop_at_eos)
        return self.result(req, n, out_ids, text, finish)

    def _prefill_prompt(self, req: Request, ids: list[int]):
        if self.prefill_chunk:
            return self.prefill_chunked(req, ids, self.prefill_chunk)
        return self.prefill(req, ids), None

    def answer_all(self, req: Request, questions: list[list[int]], params: SamplingParams, max_tokens: int,
                   on_text: Callable[[int, str], None] | None = None) -> list[GenerationResult]:
        """Answer each question from the same compressed context (restored between questions)."""
        n = req.position
        longest = max((len(q) for q in questions), default=0)
        self.check_length(n + longest)
        max_tokens = max(0, min(max_tokens, self.config.max_position_embeddings - n - longest))
        req.cache.reserve(longest + (DECODE_SLACK if req.decode_mode else max_tokens))
        snap = ContextSnapshot(req)
        results = []
        for qi, q_ids in enumerate(questions):
            if qi:
                snap.restore(req)
            snap.begin_answer(req)
            t0 = time.perf_counter()
            logits = self.forward(req, q_ids)
            req.timings.prefill_s += time.perf_counter() - t0
            cb = None if on_text is None else (lambda s, qi=qi: on_text(qi, s))
            out_ids, text, finish = self.decode(req, logits, params, max_tokens, cb)
            results.append(self.result(req, n + len(q_ids), out_ids, text, finish))
        return results

    def generate_agnostic(self, context_ids: list[int], questions: list[list[int]],
                          params: SamplingParams = SamplingParams(), max_tokens: int = 256,
                          on_text: Callable[[int, str], None] | None = None, policy=None,
                          budget=None) -> list[GenerationResult]:
        """Question-agnostic: prefill and compress the context alone, then answer each question from the
        same compressed cache (restored between questions, never recomputed)."""
        policy = policy or self.policy
        budget = budget or self.budget
        n = len(context_ids)
        self.check_length(n)
        longest = max((len(q) for q in questions), default=0)
        self.check_length(n + longest)
        req = self.new_request(capacity=min(n, self.prefill_chunk or n), policy=policy, budget=budget)
        _, final_budget = self._prefill_prompt(req, context_ids)
        self.compress(req, headroom=0, budget=final_budget)
        return self.answer_all(req, questions, params, max_tokens, on_text)

"""Prefill, compress, decode.

The engine owns one RaggedKVCache per request. Prefill runs the model over the prompt with an `attend`
callback that appends K/V to the cache, attends, and (when a policy asks) records that layer's
statistics. The policy then picks what each (layer, kv head) keeps and the cache is compacted, so the
bytes held really shrink. Decoding appends one token per step; policies with a decode mode keep the cache
at its budget while generating.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor

from kvx.errors import KvxError
from kvx.kernels import ops
from kvx.kernels.stats import LayerStats, StatsRequest, wo_gram
from kvx.runtime.cache import RaggedKVCache
from kvx.runtime.graphs import DecodeGraph, graphs_supported
from kvx.runtime.sampling import SamplingParams, make_generator, sample

# Tokens a decode-time policy may exceed its budget by before it evicts: evicting in small batches keeps
# the per-step cost low while the cache stays within budget + DECODE_SLACK.
DECODE_SLACK = 16


@dataclass
class Timings:
    prefill_s: float = 0.0
    stats_s: float = 0.0  # part of prefill spent computing policy statistics
    select_s: float = 0.0
    compact_s: float = 0.0
    decode_s: float = 0.0
    decode_evict_s: float = 0.0  # part of decode spent in decode-time eviction


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str  # "eos" | "length"
    timings: Timings
    kv_bytes_full: int  # K+V bytes a full cache of the same tokens occupies
    kv_bytes_held: int  # K+V bytes allocated at the end (kept entries + headroom)
    kv_bytes_peak: int  # most K+V bytes allocated at any point
    kv_entries_kept: int  # (layer, kv head, token) entries held at the end
    kv_entries_full: int
    policy: str = "full"
    budget: str | None = None
    lengths: list[list[int]] = field(default_factory=list)  # kept tokens per (layer, kv head) after compression

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.timings.prefill_s if self.timings.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.timings.decode_s if self.timings.decode_s else 0.0

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "finish_reason": self.finish_reason,
            "policy": self.policy,
            "budget": self.budget,
            "timings": {k: round(v, 6) for k, v in asdict(self.timings).items()},
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "kv_bytes_full": self.kv_bytes_full,
            "kv_bytes_held": self.kv_bytes_held,
            "kv_bytes_peak": self.kv_bytes_peak,
            "kv_entries_kept": self.kv_entries_kept,
            "kv_entries_full": self.kv_entries_full,
        }


@dataclass
class Request:
    """One sequence's state: its cache, the policy and budget it is compressed with, what comes next."""

    cache: RaggedKVCache
    policy: object | None = None  # kvx.policies.Policy
    budget: object | None = None  # kvx.policies.Budget
    position: int = 0  # next absolute position
    stats: list[LayerStats | None] = field(default_factory=list)
    recent_q: list[Tensor | None] = field(default_factory=list)  # AhaKV: last r queries per layer [H, r, d]
    head_budget: list[list[int]] | None = None  # decode-time target length per (layer, kv head)
    timings: Timings = field(default_factory=Timings)
    lengths_after_compress: list[list[int]] = field(default_factory=list)
    graph: object | None = None  # the captured CUDA-graph decode step (runtime/graphs.py)

    @property
    def compresses(self) -> bool:
        return self.policy is not None and self.policy.name != "full" and self.budget is not None

    @property
    def decode_mode(self) -> str | None:
        return self.policy.decode_mode if self.compresses else None


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
        cache = req.cache
        mode = req.decode_mode
        keep_recent = req.policy.window if mode == "recent_queries" else 0
        G = self.group

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, q_pre: Tensor) -> Tensor:
            cache.append(layer, k, v, positions)
            lc = cache.layers[layer]
            T = q.shape[1]
            sw = self.config.sliding_window_for(layer)
            if keep_recent:
                prev = req.recent_q[layer]
                rq = q if prev is None else torch.cat([prev, q], dim=1)
                req.recent_q[layer] = rq[:, -keep_recent:].clone()
            if T == 1 and sw is None and cache.contiguous:
                if mode == "last":
                    lc.key_mass.zero_()
                # Per-head segments are contiguous, so this beats SDPA over a strided [Hkv, cap, d] view.
                return ops.decode_attention(q[:, 0], lc.k, lc.v, lc.start, lc.length, self.scale,
                                            lc.key_mass, max_len=max(lc.capacities)).unsqueeze(1)
            # The batched [Hkv, n, d] view carries one position vector (head 0's): after a compaction heads
            # hold different positions, which a sliding window's mask must see head by head.
            if lc.is_uniform() and (sw is None or not cache.compacted):
                # A fresh prompt: attend over the contiguous k, v just computed rather than the strided
                # cache view (same values; saves SDPA a copy).
                K, V, P = (k, v, positions) if lc.lengths[0] == T else lc.dense()
                out, _ = ops.attention(q, K, V, positions, P, self.scale, sw)
                if stats_req is not None:
                    t0 = time.perf_counter()
                    req.stats[layer] = ops.layer_stats(
                        stats_req, q, K, V, positions, P, self.scale, sw, q_pre,
                        gram=self._gram(layer) if stats_req.value_out_norm else None,
                        o_proj_weight=self.model.o_proj_weight(layer) if stats_req.value_out_l1 else None)
                    req.timings.stats_s += time.perf_counter() - t0
                return out
            # Ragged cache (after compression): each kv head attends over its own segment.
            out = torch.empty_like(q)
            for g in range(cache.num_kv_heads):
                Kg, Vg, Pg = lc.head(g)
                out[g * G:(g + 1) * G], _ = ops.attention(
                    q[g * G:(g + 1) * G], Kg.unsqueeze(0), Vg.unsqueeze(0), positions, Pg, self.scale, sw)
            return out

        if mode not in ("accumulate", "last"):
            return attend

        def attend_with_mass(layer, q, k, v, positions, q_pre):
            out = attend(layer, q, k, v, positions, q_pre)
            sw = self.config.sliding_window_for(layer)
            if q.shape[1] == 1 and (sw is not None or not cache.contiguous):
                # The contiguous decode kernel adds the mass itself; these paths do not.
                _add_decode_mass(cache.layers[layer], q[:, 0], int(positions[0]), sw, self.scale, G, mode)
            return out

        return attend_with_mass

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

    def prefill(self, req: Request, ids: list[int], stats_req: StatsRequest | None = None) -> Tensor:
        """Prefill `ids`, recording the statistics the request's policy needs (or `stats_req`)."""
        if stats_req is None:
            stats_req = self.stats_request(req, len(ids))
        t0 = time.perf_counter()
        logits = self.forward(req, ids, stats_req)
        if stats_req is not None and stats_req.reconstruction:
            # KVzip: reconstruction passes score the context (their own K/V never enter the cache).
            from kvx.runtime.reconstruction import reconstruction_stats
            req.stats = reconstruction_stats(self, req, ids, req.stats, stats_req)
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
        """prefill_chunked one chunk at a time: a generator that yields after each chunk and returns
        (last logits, final budget); the batched engine runs other requests' decode steps in between."""
        from kvx.policies import Budget, Policy
        from kvx.policies.allocation import UniformAllocator

        n = len(ids)
        if chunk <= 0:
            raise KvxError("--prefill-chunk must be a positive number of tokens")
        if not req.compresses or req.budget.keeps_everything(n) or chunk >= n:
            return self.prefill(req, ids), None
        if req.policy.request.colsum_all:
            raise KvxError(f"--prefill-chunk does not work with policy {req.policy.name}: its score sums "
                           "attention over every query of the prompt")
        if any(self.config.sliding_window_for(i) is not None for i in range(self.config.num_layers)):
            raise KvxError("--prefill-chunk is not supported for models with a sliding window")
        target = req.budget.per_head(n)
        budget = Budget(tokens=target)
        interim = Policy(req.policy.name, req.policy.scorer, UniformAllocator())
        cfg = self.config
        logits = None
        for start in range(0, n, chunk):
            part = ids[start:start + chunk]
            held = req.cache.layers[0].lengths[0]
            logits = self.prefill(req, part, interim.request_for(budget, held + len(part)))
            if start + chunk >= n:
                break
            if held + len(part) > target:
                t0 = time.perf_counter()
                keep = interim.select(list(req.stats), budget, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim)
                t1 = time.perf_counter()
                req.cache.compact(keep, headroom=min(chunk, n - start - len(part)))
                req.timings.select_s += t1 - t0
                req.timings.compact_s += time.perf_counter() - t1
            req.stats = [None] * cfg.num_layers
            yield
        return logits, budget

    def fork(self, req: Request, policy=None, budget=None) -> Request:
        """A copy of a prefilled request (cache cloned, statistics shared read-only) to compress differently.

        This is how one prefill serves many (policy, budget) pairs in `kvx eval`.
        """
        cfg = self.config
        new = self.new_request(capacity=1, policy=policy, budget=budget)
        new.cache = req.cache.clone(track_mass=new.decode_mode in ("accumulate", "last"))
        new.position = req.position
        new.stats = list(req.stats)
        new.recent_q = list(req.recent_q)
        new.timings = Timings(prefill_s=req.timings.prefill_s, stats_s=req.timings.stats_s)
        return new

    # -- compression ------------------------------------------------------------------------------
    @torch.inference_mode()
    def compress(self, req: Request, headroom: int, budget=None) -> None:
        """Select with the policy from the statistics of the last prefill, then compact the cache.

        `budget` overrides the request's (chunked prefill passes the per-head equivalent)."""
        n = req.cache.layers[0].lengths[0]
        cfg = self.config
        budget = budget or req.budget
        if not req.compresses or budget.keeps_everything(n):
            req.cache.reserve(headroom)
            req.lengths_after_compress = req.cache.lengths()
            return
        t0 = time.perf_counter()
        keep = req.policy.select(list(req.stats), budget, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim)
        t1 = time.perf_counter()
        mass_seed = None
        if req.decode_mode == "accumulate":
            mass_seed = [self._group_mass(s) for s in req.stats]
        if req.decode_mode:
            headroom = min(headroom, DECODE_SLACK)
            req.head_budget = [[int(idx.numel()) for idx in layer] for layer in keep]
        req.cache.compact(keep, headroom)
        if mass_seed is not None:
            for lc, seed, layer_keep in zip(req.cache.layers, mass_seed, keep):
                for g, idx in enumerate(layer_keep):
                    lc.set_head_mass(g, seed[g][idx.to(seed.device)])
        req.stats = [None] * cfg.num_layers  # statistics are consumed: free them
        req.timings.select_s += t1 - t0
        req.timings.compact_s += time.perf_counter() - t1
        req.lengths_after_compress = req.cache.lengths()

    def _group_mass(self, stats: LayerStats) -> Tensor:
        """[Hkv, n] attention mass per key summed over each group's query heads (H2O's running score)."""
        src = stats.colsum_all if stats.colsum_all is not None else stats.col_sum
        if src is None:
            return torch.zeros(self.config.num_kv_heads, stats.n, device=self.device)
        return src.reshape(self.config.num_kv_heads, self.group, -1).sum(1)

    def _decode_evict(self, req: Request) -> None:
        """Bring every (layer, kv head) back to its budget once it exceeds it by DECODE_SLACK."""
        from kvx.policies import DecodeView  # local: policies are only needed when a policy runs

        cache = req.cache
        G = self.group
        for layer, lc in enumerate(cache.layers):
            targets = req.head_budget[layer]
            if all(n <= t + DECODE_SLACK - 1 for n, t in zip(lc.lengths, targets)):
                continue
            keep = []
            for g in range(cache.num_kv_heads):
                n, target = lc.lengths[g], targets[g]
                if n <= target:
                    keep.append(torch.arange(n, device=self.device))
                    continue
                K, V, P = lc.head(g)
                rq = req.recent_q[layer]
                view = DecodeView(
                    keys=K, values=V, positions=P, key_mass=lc.head_mass(g),
                    recent_queries=None if rq is None else rq[g * G:(g + 1) * G],
                    query_position=req.position - 1, head_dim=self.config.head_dim, scale=self.scale)
                keep.append(req.policy.decode_keep(view, target))
            cache.compact_layer(layer, keep, DECODE_SLACK)

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
            tok = sample(logits.float().cpu(), params, gen)
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
        base_timings = req.timings
        snap = _CacheSnapshot.take(req)
        results = []
        for qi, q_ids in enumerate(questions):
            snap.restore(req)
            req.timings = Timings(prefill_s=base_timings.prefill_s, stats_s=base_timings.stats_s,
                                  select_s=base_timings.select_s, compact_s=base_timings.compact_s)
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


def _add_decode_mass(lc, q: Tensor, q_pos: int, sliding_window: int | None, scale: float, G: int, mode: str) -> None:
    """H2O / TOVA statistics of one decode step: each key's probability summed over its group, added to
    (accumulate) or written over (last) the head's mass; a key the window hides gets 0."""
    for g in range(len(lc.lengths)):
        K, _, P = lc.head(g)
        logits = (q[g * G:(g + 1) * G].float() @ K.float().T) * scale
        visible = P <= q_pos
        if sliding_window is not None:
            visible &= (q_pos - P) < sliding_window
        probs = torch.softmax(logits.masked_fill(~visible[None, :], float("-inf")), dim=-1).nan_to_num(0.0)
        mass = probs.sum(0)
        lc.set_head_mass(g, mass if mode == "last" else lc.head_mass(g) + mass)


@dataclass
class _CacheSnapshot:
    """The compressed context's cache, to come back to between questions.

    Without decode-time eviction a question only appends, so rewinding lengths is enough; with it the
    pools are rebuilt, so the snapshot keeps the layer objects themselves (small: already compressed).
    """

    position: int
    layers: list
    lengths: list[list[int]]
    recent_q: list
    head_budget: list[list[int]] | None

    @classmethod
    def take(cls, req: Request) -> "_CacheSnapshot":
        import copy

        layers = [copy.copy(lc) for lc in req.cache.layers]
        for lc in layers:
            lc.lengths = list(lc.lengths)
            if lc.key_mass is not None:
                lc.key_mass = lc.key_mass.clone()
        return cls(req.position, layers, req.cache.lengths(), list(req.recent_q),
                   None if req.head_budget is None else [list(h) for h in req.head_budget])

    def restore(self, req: Request) -> None:
        req.position = self.position
        req.recent_q = list(self.recent_q)
        req.head_budget = None if self.head_budget is None else [list(h) for h in self.head_budget]
        for i, saved in enumerate(self.layers):
            import copy

            lc = copy.copy(saved)
            lc.lengths = list(self.lengths[i])
            lc.length = torch.tensor(lc.lengths, dtype=torch.int32, device=saved.k.device)
            if saved.key_mass is not None:
                lc.key_mass = saved.key_mass.clone()
            req.cache.layers[i] = lc

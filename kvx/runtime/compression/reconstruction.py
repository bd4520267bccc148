"""KVzip's context reconstruction: extra forward passes that score the prefilled context.

After the context is prefilled, each pass feeds [reconstruction prompt, end of the user turn, a chunk of
the context] at the positions after the context. The pass attends over the whole context cache plus its
own keys (the model's real attention, so its hidden states are those of a reconstruction); its scoring
softmax runs over the sinks, that chunk and its own keys (kvx.policies.kvzip), and the column max of it
lands in LayerStats.col_max of every layer.

The pass never writes to the cache: its attend callback reads the context's K/V (`LayerCache.dense()`,
views) and hands them with its own K/V to `ops.reconstruction_attention`, which returns the layer's
attention output and the column max together (kernels/reconstruction.py: on the CPU one sweep over the
scored keys serves both, the rest of the context goes through the unmasked flash kernel). So nothing of the
reconstruction can stay in the kept cache, and the context's entries stay bit for bit as the prefill left
them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from kvx.errors import KvxError
from kvx.kernels import ops
from kvx.kernels.stats import LayerStats, StatsRequest
from kvx.policies.kvzip import FIRST_PROMPT, NEXT_PROMPT


@dataclass(frozen=True)
class ReconstructionPlan:
    """Token ids of every pass and which context tokens [start, end) each one scores."""

    passes: list[tuple[list[int], int, int]]  # (ids fed, chunk start, chunk end)
    prefix: int  # context tokens before the first chunk (the chat template's prefix)


def template_parts(tokenizer) -> tuple[list[int], list[int], list[int], list[int]]:
    """(template prefix ids, end-of-user-turn + assistant header ids, first prompt ids, next prompt ids)."""
    first = list(tokenizer.encode(FIRST_PROMPT, add_special_tokens=False))
    nxt = list(tokenizer.encode(NEXT_PROMPT, add_special_tokens=False))
    if getattr(tokenizer, "has_chat_template", False):
        from kvx.models.tokenizer import split_chat_turn

        head, tail = split_chat_turn(tokenizer, "", "")
        return (list(tokenizer.encode(head, add_special_tokens=True)),
                list(tokenizer.encode(tail, add_special_tokens=False)), first, nxt)
    return [], list(tokenizer.encode("\n", add_special_tokens=False)), first, nxt


def plan_passes(context_ids: list[int], prefix_ids: list[int], suffix_ids: list[int], first_ids: list[int],
                next_ids: list[int], chunk: int, cue: int) -> ReconstructionPlan:
    """Chunks of `chunk` tokens after the template prefix, each with its prompt (and the previous chunk's
    last `cue` tokens from the second chunk on)."""
    n = len(context_ids)
    prefix = 0
    while prefix < min(len(prefix_ids), n - 1) and context_ids[prefix] == prefix_ids[prefix]:
        prefix += 1
    passes = []
    for start in range(prefix, n, chunk):
        end = min(n, start + chunk)
        prompt = list(first_ids) if start == prefix else list(next_ids) + context_ids[max(prefix, start - cue):start]
        passes.append((prompt + list(suffix_ids) + context_ids[start:end], start, end))
    return ReconstructionPlan(passes=passes, prefix=prefix)


def _score_pass(engine, req, ids: list[int], start: int, end: int, sinks: int, col_max: list[Tensor],
                plus: bool) -> None:
    """One pass over the chunk [start, end); its scoring softmax's sinks are the first `sinks` tokens."""
    cfg = engine.config
    n = req.position
    T = len(ids)
    device = engine.device
    positions = torch.arange(n, n + T, device=device)
    s = min(sinks, start)
    row_norms: list[Tensor | None] = [None] * cfg.num_layers

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, q_pre: Tensor) -> Tensor:
        Kc, Vc, Pc = req.cache.layers[layer].dense()  # the context, read only
        weight = None
        if plus:
            weight = 1.0 / row_norms[layer].clamp(min=torch.finfo(torch.float32).tiny)
        out, cm = ops.reconstruction_attention(q, Kc, Vc, Pc, k, v, pos, s, start, end, engine.scale, weight)
        dst = col_max[layer]
        dst[:, :s] = torch.maximum(dst[:, :s], cm[:, :s])
        dst[:, start:end] = torch.maximum(dst[:, start:end], cm[:, s:])
        return out

    ids_t = torch.tensor(ids, dtype=torch.long, device=device)
    if plus:
        def record(layer: int, x: Tensor) -> None:  # KVzip+'s row normaliser: ||x_t|| entering the layer
            row_norms[layer] = torch.linalg.vector_norm(x.float(), dim=-1)

        engine.model(ids_t, positions, attend, last_only=True, on_residual=record)
    else:
        engine.model(ids_t, positions, attend, last_only=True)


@torch.inference_mode()
def reconstruction_stats(engine, req, context_ids: list[int], stats: list[LayerStats | None] | None = None,
                         request: StatsRequest | None = None) -> list[LayerStats]:
    """Every layer's statistics with col_max filled by KVzip's reconstruction passes over `context_ids`.

    `req` holds exactly the prefilled context (uniform cache, req.position == len(context_ids)); it is only
    read. `stats` are the prefill's token-side statistics (KVzip+'s ||v W_O^h||), completed in place.
    `request` says how to reconstruct (chunk, cue, sinks, plus); by default the request's policy's.
    """
    request = request or req.policy.request
    cfg = engine.config
    n = len(context_ids)
    if engine.prefill_chunk and engine.prefill_chunk <= n:
        raise KvxError("--prefill-chunk does not work with kvzip: it scores the whole context at once")
    if req.position != n or any(not lc.is_uniform() or lc.lengths[0] != n for lc in req.cache.layers):
        raise KvxError("kvzip scores a whole context at once: it needs the uncompressed context in the cache "
                       "(it does not work with --prefill-chunk)")
    if any(cfg.sliding_window_for(i) is not None for i in range(cfg.num_layers)):
        raise KvxError("kvzip is not supported for models with a sliding window")
    t0 = time.perf_counter()
    prefix_ids, suffix_ids, first_ids, next_ids = template_parts(engine.tokenizer)
    plan = plan_passes(context_ids, prefix_ids, suffix_ids, first_ids, next_ids, request.reconstruction,
                       request.reconstruction_cue)
    # The authors' code uses the whole template prefix (the system prompt) as the sinks and never evicts it;
    # kvpress takes the first n_sink tokens and leaves the rest of the prefix unscored (evicted first).
    sinks = request.reconstruction_sinks
    if request.reconstruction_keep_prefix:
        sinks = max(sinks, plan.prefix)
    col_max = [torch.zeros(cfg.num_heads, n, dtype=torch.float32, device=engine.device)
               for _ in range(cfg.num_layers)]
    for ids, start, end in plan.passes:
        _score_pass(engine, req, ids, start, end, sinks, col_max, request.reconstruction_plus)
    out = []
    for layer, lc in enumerate(req.cache.layers):
        st = stats[layer] if stats is not None and stats[layer] is not None else None
        if st is None:
            st = LayerStats(n=n, positions=lc.dense()[2])
        st.col_max = col_max[layer]
        st.protected_prefix = plan.prefix if request.reconstruction_keep_prefix else 0
        out.append(st)
    req.timings.stats_s += time.perf_counter() - t0
    return out

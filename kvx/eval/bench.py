"""Speed benchmarks, always as ratios against a baseline measured in the same run.

- `runtime_vs_transformers`: kvx and HF transformers on the same model folder and dtype: prefill tokens/s
  and decode tokens/s at several context lengths (medians of repeated runs).
- `compression`: compression overhead (statistics + selection + compaction) as a fraction of prefill, and
  decode tokens/s at a long context for several budgets.

The prompt is real text (CPython's pydoc_data prose), tokenised and cut to the exact length.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from kvx.eval.haystack import filler_ids
from kvx.eval.hf_cache import cache_arg, cache_of
from kvx.runtime.engine.model_runner import ModelRunner


def prose_ids(tokenizer, n: int) -> list[int]:
    """Exactly n token ids of English prose (the same filler `kvx profile` uses)."""
    return filler_ids(tokenizer, n, first=False)[:n]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class SpeedRow:
    phase: str  # "prefill" | "decode"
    context: int
    kvx_tokens_per_s: float
    hf_tokens_per_s: float | None

    @property
    def ratio(self) -> float | None:
        return self.kvx_tokens_per_s / self.hf_tokens_per_s if self.hf_tokens_per_s else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def _pool_for(engine: ModelRunner, prompts: list[list[int]], max_tokens: int, policy=None, budget=None):
    """A pool sized as the engine sizes these requests' worst cases (scheduler.worst_case_blocks)."""
    from kvx.runtime.cache.pool import DEFAULT_BLOCK_SIZE, BlockPool
    from kvx.runtime.engine.scheduler import worst_case_blocks

    cfg = engine.config
    blocks = sum(worst_case_blocks(cfg, DEFAULT_BLOCK_SIZE, len(ids), 0, max_tokens, policy, budget)
                 for ids in prompts)
    return BlockPool(blocks, DEFAULT_BLOCK_SIZE, cfg.head_dim, engine.dtype, engine.device)


def kvx_prefill_tps(engine: ModelRunner, ids: list[int]) -> float:
    req = engine.new_request(_pool_for(engine, [ids], 0), capacity=len(ids))
    _sync(engine.device)
    t0 = time.perf_counter()
    engine.prefill(req, ids)
    _sync(engine.device)
    return len(ids) / (time.perf_counter() - t0)


def kvx_batch_decode_tps(engine: ModelRunner, prompts: list[list[int]], steps: int, policy=None,
                         budget=None) -> tuple[float, int]:
    """Decode tokens/s of len(prompts) requests decoding together in one pool sized for them: every prompt
    prefilled first (one piece each), one warm-up step (CUDA graph capture, allocator), then `steps` timed
    steps of one token per request. Returns (tokens/s, the most requests one step ran)."""
    from kvx.runtime.engine.batch_engine import BatchEngine
    from kvx.runtime.engine.sequence import DECODE, GenerationRequest

    batch = BatchEngine(engine, pool=_pool_for(engine, prompts, steps + 4, policy, budget), max_batch=len(prompts),
                        prefill_step=max(len(p) for p in prompts), prefill_first=True)
    seqs = [batch.submit(GenerationRequest(prompt_ids=list(p), max_tokens=steps + 4, stop_at_eos=False,
                                           policy=policy, budget=budget)) for p in prompts]
    while batch.scheduler.waiting or any(s.state != DECODE for s in batch.scheduler.running):
        batch.step()
    batch.step()
    _sync(engine.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        batch.step()
    _sync(engine.device)
    elapsed = time.perf_counter() - t0
    assert not any(s.done for s in seqs), "the timed steps must all decode"
    running = batch.max_running
    for s in seqs:
        batch.cancel(s)
    return len(prompts) * steps / elapsed, running


def kvx_decode_tps(engine: ModelRunner, ids: list[int], steps: int, policy=None, budget=None) -> float:
    """Decode tokens/s of one request alone: a batch of one, the engine `kvx generate` runs."""
    return kvx_batch_decode_tps(engine, [ids], steps, policy, budget)[0]


def hf_prefill_tps(hf_model, ids: list[int]) -> float:
    x = torch.tensor([ids], device=hf_model.device)
    _sync(hf_model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        hf_model(x, use_cache=True, logits_to_keep=1)
    _sync(hf_model.device)
    return len(ids) / (time.perf_counter() - t0)


def hf_decode_tps(hf_model, ids: list[int], steps: int) -> float:
    x = torch.tensor([ids], device=hf_model.device)
    with torch.inference_mode():
        key = cache_arg(hf_model)
        out = hf_model(x, use_cache=True, logits_to_keep=1)
        past = cache_of(out)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        out = hf_model(tok, **{key: past}, use_cache=True)  # warm-up step
        past, tok = cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(hf_model.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = hf_model(tok, **{key: past}, use_cache=True)
            past, tok = cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(hf_model.device)
    return steps / (time.perf_counter() - t0)


def median_of(fn, repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def runtime_vs_transformers(model_dir, engine: ModelRunner, tokenizer, prefill_contexts=(1024, 4096),
                            decode_contexts=(1024, 4096, 8192), decode_steps: int = 16, repeats: int = 3,
                            with_hf: bool = True, progress=None) -> list[SpeedRow]:
    hf = None
    if with_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=engine.dtype, attn_implementation="sdpa")
        hf = hf.to(engine.device).eval()
    limit = engine.config.max_position_embeddings
    rows = []
    for n in prefill_contexts:
        ids = prose_ids(tokenizer, min(n, limit - 1))
        kvx_prefill_tps(engine, ids[:64])  # warm-up
        k = median_of(lambda: kvx_prefill_tps(engine, ids), repeats)
        h = median_of(lambda: hf_prefill_tps(hf, ids), repeats) if hf is not None else None
        rows.append(SpeedRow("prefill", len(ids), k, h))
        if progress:
            progress(rows[-1])
    for n in decode_contexts:
        ids = prose_ids(tokenizer, min(n, limit - decode_steps - 4))
        k = median_of(lambda: kvx_decode_tps(engine, ids, decode_steps), repeats)
        h = median_of(lambda: hf_decode_tps(hf, ids, decode_steps), repeats) if hf is not None else None
        rows.append(SpeedRow("decode", len(ids), k, h))
        if progress:
            progress(rows[-1])
    return rows


@dataclass
class CompressionRow:
    policy: str
    budget: str
    context: int
    prefill_s: float
    stats_s: float
    select_s: float
    compact_s: float
    decode_tokens_per_s: float | None = None

    @property
    def overhead(self) -> float:
        """(statistics + selection + compaction) / the prefill without statistics."""
        base = self.prefill_s - self.stats_s
        return (self.stats_s + self.select_s + self.compact_s) / base if base > 0 else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["overhead"] = self.overhead
        return d


def compression(engine: ModelRunner, tokenizer, policies: list[str], budgets: list[str], contexts=(4096, 8192),
                decode_context: int = 8192, decode_steps: int = 16, progress=None) -> list[CompressionRow]:
    from kvx.policies import build_policy, parse_budget

    limit = engine.config.max_position_embeddings
    rows = []
    for n in contexts:
        ids = prose_ids(tokenizer, min(n, limit - 1))
        for name in policies:
            policy, budget = build_policy(name), parse_budget(budgets[0])
            req = engine.new_request(_pool_for(engine, [ids], 0, policy, budget), capacity=len(ids), policy=policy,
                                     budget=budget)
            engine.prefill(req, ids)
            engine.compress(req, headroom=0)
            t = req.timings
            rows.append(CompressionRow(name, budgets[0], len(ids), t.prefill_s, t.stats_s, t.select_s, t.compact_s))
            if progress:
                progress(rows[-1])
    ids = prose_ids(tokenizer, min(decode_context, limit - decode_steps - 4))
    for name in policies[:1]:
        for b in ["100%"] + [b for b in budgets if b != "100%"]:
            policy, budget = build_policy(name), parse_budget(b)
            tps = kvx_decode_tps(engine, ids, decode_steps, policy=policy, budget=budget)
            rows.append(CompressionRow(name, b, len(ids), 0.0, 0.0, 0.0, 0.0, decode_tokens_per_s=tps))
            if progress:
                progress(rows[-1])
    return rows

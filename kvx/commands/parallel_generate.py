"""`kvx generate --tensor-parallel N`: one prompt (or one context and its questions) on N ranks.

Rank 0 is this process: it streams the text and returns the results to the command line. Every rank loads
its slice of the model (models/sharding.py), tokenizes the same text and runs the same request through the
one engine (run_alone); the tokens are rank 0's (runtime/parallel). The memory check is each rank's own:
its slice of the weights and of the cache against its device's free memory.
"""

from __future__ import annotations

from typing import Callable, Optional

from kvx.errors import KvxError


def generate_on_ranks(world: int, model: Optional[str], device: str, dtype: str, policy: str, budget, allocation,
                      policy_args: list[str], prefill_chunk, use_graphs: bool, params, max_tokens: int,
                      system: Optional[str], raw: bool, prompt: Optional[str] = None,
                      context: tuple[str, list[str]] | None = None,
                      on_text: Callable[[int, str], None] | None = None):
    """The results (one per question, or one) of rank 0."""
    from kvx.models.hub import resolve_model
    from kvx.options import resolve_device
    from kvx.runtime.parallel.launch import run_ranks, under_torchrun

    path = str(resolve_model(model))
    dev = resolve_device(device)
    if dev == "cuda" and not under_torchrun():
        import torch

        if torch.cuda.device_count() < world:
            raise KvxError(f"--tensor-parallel {world} needs {world} GPUs; this machine has "
                           f"{torch.cuda.device_count()} (or use --device cpu)")
    _check_split(path, world)
    args = (path, dev, dtype, policy, budget, allocation, policy_args, prefill_chunk, use_graphs, params,
            max_tokens, system, raw, prompt, context)
    return run_ranks(world, rank_main, args, {"on_text": on_text}, device=dev)


def _check_split(path: str, world: int) -> None:
    """A model that cannot split over `world` ranks fails here, before any rank starts."""
    from kvx.models.config import load_config
    from kvx.models.sharding import check_world

    check_world(load_config(path), world)


def rank_main(tp, path, device, dtype, policy, budget, allocation, policy_args, prefill_chunk, use_graphs, params,
              max_tokens, system, raw, prompt, context, on_text=None):
    """One rank's whole run (module-level: the spawned ranks import it)."""
    from kvx.options import build_engine, check_memory, encode_prompt, load_rank, split_context_question
    from kvx.runtime.engine.batch_engine import run_alone
    from kvx.runtime.engine.sequence import GenerationRequest

    llm, tok = load_rank(path, tp, device, dtype)
    engine = build_engine(llm, tok, policy, budget, allocation, policy_args, use_graphs=use_graphs,
                          prefill_chunk=prefill_chunk)
    callback = None if on_text is None else (lambda seq, qi, piece: on_text(qi, piece))
    if context is not None:
        ctx_text, questions = context
        ids = [split_context_question(tok, ctx_text, q, system, raw) for q in questions]
        ctx_ids = ids[0][0]
        engine.check_length(len(ctx_ids))
        check_memory(engine, len(ctx_ids), max_tokens, question_tokens=max(len(q) for _, q in ids))
        request = GenerationRequest(context_ids=ctx_ids, question_ids=[q for _, q in ids], params=params,
                                    max_tokens=max_tokens, policy=engine.policy, budget=engine.budget,
                                    on_text=callback)
        return run_alone(engine, request).results
    ids = encode_prompt(tok, prompt, system, raw)
    engine.check_length(len(ids))
    check_memory(engine, len(ids), max_tokens)
    request = GenerationRequest(prompt_ids=ids, params=params, max_tokens=max_tokens, policy=engine.policy,
                                budget=engine.budget, on_text=callback)
    return run_alone(engine, request).results


def jsonl_on_ranks(world: int, inp, out, *, model, device, dtype, progress=None, **options) -> int:
    """`kvx generate --jsonl --tensor-parallel N`: rank 0 (this process) reads the lines and writes the
    results (pipeline.run_jsonl), the other ranks follow its plans. Returns the failed lines' count."""
    from kvx.models.hub import resolve_model
    from kvx.options import resolve_device
    from kvx.runtime.parallel.launch import run_ranks

    path = str(resolve_model(model))
    dev = resolve_device(device)
    _check_split(path, world)
    return run_ranks(world, jsonl_rank, (path, dev, dtype, options),
                     {"inp": inp, "out": out, "progress": progress}, device=dev)


def jsonl_rank(tp, path, device, dtype, options, inp=None, out=None, progress=None):
    from kvx.options import build_engine, load_rank
    from kvx.pipeline import jsonl_batch, run_jsonl
    from kvx.runtime.parallel.plan import follow

    llm, tok = load_rank(path, tp, device, dtype)
    if tp.rank == 0:
        return run_jsonl(inp, out, model=path, device=device, dtype=dtype, progress=progress, loaded=(llm, tok),
                         tp=tp, **options)
    engine = build_engine(llm, tok, "full", None, None, [], use_graphs=options.get("use_graphs", True),
                          prefill_chunk=options.get("prefill_chunk"))
    follow(jsonl_batch(engine, options.get("kv_memory"), options.get("max_batch"), options.get("prefill_step"),
                       options.get("prefill_first", False), tp), tp)
    return None

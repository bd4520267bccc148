"""Stored contexts on tensor-parallel ranks: `kvx compress --tp N` and `kvx generate --load-context --tp N`.

Each rank compresses (or answers from) its own kv heads, as `kvx generate --tp` runs a request; the file is
the whole model's either way (runtime/parallel/stored_shards.py): compressing, rank 0 gathers the ranks'
kept entries and writes them; answering, every rank reads the file and keeps its heads' share (under
`torchrun --nnodes` the file must be readable on every machine).
"""

from __future__ import annotations

from typing import Callable, Optional

from kvx.commands.parallel_generate import _check_split


def compress_on_ranks(world: int, model: Optional[str], device: str, dtype: str, policy: str, budget: str,
                      allocation: Optional[str], policy_args: list[str], system: Optional[str], raw: bool,
                      text: str, quiet: bool):
    """(the whole model's StoredContext, rank 0's timings, the model's config, the policy's name, the
    budget) on rank 0, as compress._compress; None on another rank under torchrun."""
    from kvx.models.hub import resolve_model
    from kvx.options import resolve_device
    from kvx.runtime.parallel.launch import run_ranks

    path = str(resolve_model(model))
    dev = resolve_device(device)
    _check_split(path, world)
    args = (path, dev, dtype, policy, budget, allocation, policy_args, system, raw, text)
    return run_ranks(world, compress_rank, args, {"quiet": quiet}, device=dev)


def compress_rank(tp, path, device, dtype, policy, budget, allocation, policy_args, system, raw, text, quiet=True):
    from kvx.context_options import context_info
    from kvx.options import build_engine, check_memory, load_rank, split_context_question
    from kvx.runtime.contexts.run import compress_context
    llm, tok = load_rank(path, tp, device, dtype)
    engine = build_engine(llm, tok, policy, budget, allocation, policy_args)
    ctx_ids, _ = split_context_question(tok, text, "", system, raw)
    engine.check_length(len(ctx_ids))
    check_memory(engine, len(ctx_ids), 0)
    info = context_info(llm, tok, engine.dtype, policy, budget, allocation, policy_args, system, raw, len(ctx_ids))
    status = None
    if tp.rank == 0 and not quiet:
        from kvx.status_line import PrefillStatus

        status = PrefillStatus.for_stderr(len(ctx_ids), quiet, f" and compressing them ({engine.policy.name} @ "
                                          f"{engine.budget}) on {tp.world} ranks")
        status = status.start() if status is not None else None
    try:
        whole, timings = compress_context(engine, ctx_ids, info)
    finally:
        if status is not None:
            status.stop()
    # The engine gathered the ranks' kept entries when the compression ended: the whole model's on rank 0.
    return None if whole is None else (whole, timings, llm.full_config, engine.policy.name, str(engine.budget))


def answer_on_ranks(world: int, file: str, model: Optional[str], device: str, dtype: str, questions: list[str],
                    params, max_tokens: int, use_graphs: bool, on_text: Callable[[int, str], None] | None = None):
    """(rank 0's results, the context's token count) on rank 0; None on another rank under torchrun."""
    from kvx.models.hub import resolve_model
    from kvx.options import resolve_device
    from kvx.runtime.parallel.launch import run_ranks

    path = str(resolve_model(model))
    dev = resolve_device(device)
    _check_split(path, world)
    args = (file, path, dev, dtype, questions, params, max_tokens, use_graphs)
    return run_ranks(world, answer_rank, args, {"on_text": on_text}, device=dev)


def answer_rank(tp, file, path, device, dtype, questions, params, max_tokens, use_graphs, on_text=None):
    from kvx.context_options import check_context_memory, open_context_file, question_ids
    from kvx.options import build_engine, load_rank
    from kvx.runtime.contexts.resident import ResidentContext
    from kvx.runtime.contexts.run import answer_from_context
    from kvx.runtime.parallel.stored_shards import rank_share

    llm, tok = load_rank(path, tp, device, dtype)
    engine = build_engine(llm, tok, "full", None, None, [], use_graphs=use_graphs)
    whole = open_context_file(file, llm, tok, engine.dtype)  # checked against the whole model's config
    full = llm.full_config
    ctx = ResidentContext(rank_share(whole, llm.shard, full.num_kv_heads, tp.world))
    ids = [question_ids(tok, whole, q) for q in questions]
    engine.check_length(whole.position + max(len(q) for q in ids))
    check_context_memory(engine, ctx, ids, max_tokens)
    return answer_from_context(engine, ctx, ids, params, max_tokens, on_text=on_text), whole.position

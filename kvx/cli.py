"""The kvx command line: thin commands over models, runtime, policies and eval.

Text goes to stdout; progress, warnings and the summary line go to stderr. A user error prints one line
(`kvx: error: ...`) and exits with code 2.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional

import typer

from kvx import __version__
from kvx.errors import KvxError
from kvx.options import (
    DEFAULT_POLICY,
    build_engine,
    check_device_dtype,
    check_jsonl_only,
    check_memory,
    check_prefill_step,
    check_sampling,
    encode_prompt,
    load,
    parse_memory,
    policy_and_budget,
    policy_name,
    resolve_dtype,
    short_prompt_note,
    split_context_question,
)
from kvx.result_view import result_json, summary_line

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


class _Answers:
    """Streams the answers of one context's questions: one question's answer as it is; several, each under
    a `Q<n>: question` line and apart from the next (an empty answer keeps its header)."""

    def __init__(self, questions: list[str], write: Callable[[str], None]):
        self.questions, self.write = questions, write
        self.next = 0  # the first question whose header is not written yet

    def _open(self, upto: int) -> None:
        while self.next <= upto:
            if len(self.questions) > 1:
                self.write(("\n\n" if self.next else "") + f"Q{self.next + 1}: {self.questions[self.next]}\n")
            self.next += 1

    def text(self, qi: int, piece: str) -> None:
        self._open(qi)
        self.write(piece)

    def close(self) -> None:
        self._open(len(self.questions) - 1)
        self.write("\n")


def _prefill_status(engine, tokens: int, quiet: bool):
    """A started PrefillStatus for a long prompt on a terminal, else None."""
    from kvx.status_line import PrefillStatus

    pol, bud = engine.policy, engine.budget
    what = f" and compressing them ({pol.name} @ {bud})" if pol is not None and bud is not None else ""
    status = PrefillStatus.for_stderr(tokens, quiet, what)
    return status.start() if status is not None else None


def _note(message: str | None, quiet: bool) -> None:
    if message and not quiet:
        _err(message)


def _version(value: bool) -> None:
    if value:
        print(f"kvx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


# -- generate ----------------------------------------------------------------------------------------

@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="The prompt. Omit it or pass - to read it from stdin."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hugging Face model folder, or hub id ORG/NAME[@revision] (default: SmolLM2-135M-Instruct, pulled on first use)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=0, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="At least 0; 0 = greedy (default)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, above 0 and at most 1."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = all)."),
    seed: int = typer.Option(0, "--seed", help="Random seed for sampling, 0 to 2^64-1."),
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as is, without the chat template."),
    system: Optional[str] = typer.Option(None, "--system", help="System message for the chat template."),
    policy: Optional[str] = typer.Option(None, "--policy", "-p", help=f"Eviction policy (see `kvx policies`); default: {DEFAULT_POLICY} with --budget, else full."),
    budget: Optional[str] = typer.Option(None, "--budget", "-b", help="KV budget: '5%' of all entries, or '512' tokens per kv head on average."),
    allocation: Optional[str] = typer.Option(None, "--allocation", help="Override the policy's allocator: uniform, pyramid, ada, global."),
    policy_arg: List[str] = typer.Option([], "--policy-arg", help="Policy option key=value (repeatable), e.g. window=32."),
    context: Optional[str] = typer.Option(None, "--context", help="Question-agnostic mode: a context FILE (or -) compressed before the question is seen."),
    question: List[str] = typer.Option([], "--question", "-q", help="Question about --context or --load-context (repeatable: one compressed context answers all)."),
    load_context: Optional[str] = typer.Option(None, "--load-context", help="Answer the --question(s) from a context compressed earlier by `kvx compress` (a .kvc file): nothing of it is prefilled again."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (CPU: int8 weights through kvx's C kernels, built on first use with the system's C compiler; KVX_NATIVE=0 for PyTorch's; float32 activations and cache. GPU: bfloat16), float32, bfloat16, float16."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text, token counts, timings, KV bytes) instead of streaming text."),
    jsonl: bool = typer.Option(False, "--jsonl", help="Pipeline mode: read one request object per line on stdin, write one result per line."),
    quiet: bool = typer.Option(False, "--quiet", help="No summary line, notes or live status on stderr (with --jsonl, no per-line error messages either: each failed line has its error object on stdout)."),
    no_graph: bool = typer.Option(False, "--no-graph", help="GPU: decode eagerly instead of replaying a CUDA graph."),
    prefill_chunk: Optional[int] = typer.Option(None, "--prefill-chunk", help="Prefill N tokens at a time and evict between chunks: the cache peaks near budget + N instead of the whole prompt."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", min=1, help="--jsonl: most requests decoding at once over the shared KV pool (default 16; 1 = one at a time)."),
    prefill_step: Optional[int] = typer.Option(None, "--prefill-step", help="--jsonl: prefill a long prompt N tokens per engine step, exactly (nothing evicted in between), so running requests keep decoding (default: 512 on the CPU, 8192 on a GPU)."),
    prefill_first: bool = typer.Option(False, "--prefill-first", help="--jsonl: fill the batch before decoding - no decode step while an admitted prompt is still being prefilled (more tokens/s, later first tokens)."),
    kv_memory: Optional[str] = typer.Option(None, "--kv-memory", help="--jsonl: the KV pool's size, e.g. 2GiB (default: 60% of free GPU memory; on the CPU a quarter of available memory, at most 4GiB)."),
    ordered: bool = typer.Option(False, "--ordered", help="--jsonl: write results in input order (default: each as soon as it finishes)."),
    tensor_parallel: int = typer.Option(1, "--tensor-parallel", "--tp", help="Split the model and its KV cache by kv head over N ranks (N local processes; or as many as torchrun starts)."),
    compile_step: bool = typer.Option(False, "--compile", help="CPU: compile the decode step with torch.compile (seconds, once per run; needs a C++ compiler). Slower than the default step since kvx's C kernels (0.67x measured, docs/benchmarks.md); a few percent faster than PyTorch's kernels under KVX_NATIVE=0. A lone request only: not with --jsonl or --tensor-parallel."),
) -> None:
    """Generate text, optionally with a compressed KV cache.

    \b
    kvx generate "What is the capital of France?"
    echo "Tell me a joke" | kvx generate
    kvx generate --policy snapkv --budget 10% "$(cat long.txt) Summarise it."
    kvx generate --policy ada-snapkv --budget 5% --context paper.txt \\
        -q "What is the main result?" -q "Who are the authors?"
    kvx generate --jsonl --max-batch 16 --kv-memory 2GiB < in.jsonl > out.jsonl
    kvx compress --context paper.txt --budget 10% -o paper.kvc
    kvx generate --load-context paper.kvc -q "What is the main result?"
    """
    from kvx.inputs import Output, check_utf8, read_stdin, read_text_file, utf8_lines
    from kvx.runtime.engine.sampling import SamplingParams

    out = Output(sys.stdout)

    # Every option is checked before anything slow (stdin, the model): a bad value fails at once.
    params = check_sampling(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))
    check_device_dtype(device, dtype)
    policy_given = policy is not None
    policy = policy_name(policy, budget)
    policy_and_budget(policy, budget, allocation, policy_arg, prefill_chunk)
    if system is not None:
        check_utf8(system, "--system")
    pool_bytes = parse_memory(kv_memory) if kv_memory is not None else None
    check_prefill_step(prefill_step)
    check_jsonl_only(jsonl, {"--max-batch": max_batch is not None, "--prefill-step": prefill_step is not None,
                             "--prefill-first": prefill_first, "--kv-memory": kv_memory is not None,
                             "--ordered": ordered})
    if tensor_parallel < 1:
        raise KvxError(f"--tensor-parallel must be at least 1, got {tensor_parallel}")
    if compile_step and (jsonl or tensor_parallel != 1):
        raise KvxError("--compile compiles a lone request's decode step; drop it with "
                       + ("--jsonl (a batch keeps the eager kernels)" if jsonl else "--tensor-parallel"))
    if jsonl:
        if prompt is not None or context is not None or question:
            raise KvxError("--jsonl reads its requests from stdin; it takes no PROMPT, --context or --question")
        if as_json:
            raise KvxError("--jsonl already prints JSON, one result per line; drop --json")
        from kvx.pipeline import run_jsonl
        from kvx.status_line import BatchProgress

        inp = utf8_lines(sys.stdin.buffer, per_line=True) if hasattr(sys.stdin, "buffer") else sys.stdin
        if tensor_parallel != 1:
            from kvx.commands.parallel_generate import jsonl_on_ranks

            run_jsonl = partial(jsonl_on_ranks, tensor_parallel)  # rank 0 reads and writes, the others follow
        failures = run_jsonl(inp, out, model=model, device=device, dtype=dtype, policy=policy,
                             budget=budget, allocation=allocation, policy_args=policy_arg, params=params,
                             max_tokens=max_tokens, raw=raw, system=system, quiet=quiet,
                             use_graphs=not no_graph, prefill_chunk=prefill_chunk, max_batch=max_batch,
                             kv_memory=pool_bytes, ordered=ordered, prefill_step=prefill_step,
                             prefill_first=prefill_first, progress=BatchProgress.for_stderr(quiet))
        raise typer.Exit(1 if failures else 0)

    if load_context is not None:
        from kvx.context_options import file_dtype, refuse_policy_options

        if jsonl:
            raise KvxError("--jsonl names a context file per line (\"context_file\"); drop --load-context")
        if context is not None or prompt is not None:
            raise KvxError("--load-context takes its questions from --question; drop --context and the PROMPT")
        refuse_policy_options({"--policy": policy_given, "--budget": budget is not None,
                               "--allocation": allocation is not None, "--policy-arg": bool(policy_arg),
                               "--prefill-chunk": prefill_chunk is not None, "--system": system is not None,
                               "--raw": raw})
        if not question:
            raise KvxError("--load-context needs at least one --question")
        for q in question:
            if not check_utf8(q, "--question").strip():
                raise KvxError("--question: a question is empty")
        dtype = file_dtype(load_context, dtype)  # a bad file fails here, before the model loads
        if tensor_parallel != 1:
            _answer_from_file_on_ranks(tensor_parallel, load_context, question, model, device, dtype, params,
                                       max_tokens, as_json, quiet, not no_graph, out)
            return
        _answer_from_file(load_context, question, model, device, dtype, params, max_tokens, as_json, quiet,
                          not no_graph, out, compile_step)
        return
    if context is None and question:
        raise KvxError("--question needs --context or --load-context (or put the question in the prompt)")
    if context is not None:
        if not question:
            raise KvxError("--context needs at least one --question")
        if prompt is not None:
            raise KvxError("--context takes its questions from --question; drop the PROMPT argument")
        for q in question:
            if not check_utf8(q, "--question").strip():
                raise KvxError("--question: a question is empty")
        ctx_text = read_text_file(context, "context")
        if not ctx_text.strip():
            raise KvxError("the context is empty")
    else:
        prompt = read_stdin() if prompt is None or prompt == "-" else check_utf8(prompt, "the prompt")
        if not prompt.strip():
            raise KvxError("the prompt is empty")

    if tensor_parallel != 1:
        _generate_on_ranks(tensor_parallel, out, as_json, quiet, model=model, device=device, dtype=dtype,
                           policy=policy, budget=budget, allocation=allocation, policy_args=policy_arg,
                           prefill_chunk=prefill_chunk, use_graphs=not no_graph, params=params,
                           max_tokens=max_tokens, system=system, raw=raw, prompt=prompt,
                           context=(ctx_text, question) if context is not None else None)
        return

    from kvx.runtime.engine.batch_engine import run_alone
    from kvx.runtime.engine.sequence import GenerationRequest

    llm, tok = load(model, device, dtype, quiet=as_json and quiet)
    if compile_step:
        _compile(llm, quiet)
    engine = build_engine(llm, tok, policy, budget, allocation, policy_arg, use_graphs=not no_graph,
                          prefill_chunk=prefill_chunk)

    status = None  # the spinner of a long prefill (a terminal's stderr only), gone at the first text

    def stream(text: str) -> None:
        if status is not None:
            status.stop()
        out.write(text)
        out.flush()

    if context is not None:
        ids = [split_context_question(tok, ctx_text, q, system, raw) for q in question]
        ctx_ids = ids[0][0]
        engine.check_length(len(ctx_ids))
        check_memory(engine, len(ctx_ids), max_tokens, question_tokens=max(len(q) for _, q in ids))
        _note(short_prompt_note(engine, len(ctx_ids)), quiet)
        answers = _Answers(question, stream)
        status = _prefill_status(engine, len(ctx_ids), quiet)
        request = GenerationRequest(context_ids=ctx_ids, question_ids=[q for _, q in ids], params=params,
                                    max_tokens=max_tokens, policy=engine.policy, budget=engine.budget,
                                    on_text=None if as_json else (lambda seq, qi, piece: answers.text(qi, piece)))
        try:
            results = run_alone(engine, request).results
        finally:
            if status is not None:
                status.stop()
        if as_json:
            stream(json.dumps({"results": [result_json(r, question=q) for r, q in zip(results, question)]}) + "\n")
        else:
            answers.close()
        if not quiet:
            for r in results:
                _err(summary_line(r))
        return

    ids = encode_prompt(tok, prompt, system, raw)
    engine.check_length(len(ids))
    check_memory(engine, len(ids), max_tokens)
    _note(short_prompt_note(engine, len(ids)), quiet)
    status = _prefill_status(engine, len(ids), quiet)
    request = GenerationRequest(prompt_ids=ids, params=params, max_tokens=max_tokens, policy=engine.policy,
                                budget=engine.budget, on_text=None if as_json else (lambda seq, qi, piece: stream(piece)))
    try:
        result = run_alone(engine, request).results[0]
    finally:
        if status is not None:
            status.stop()
    if as_json:
        stream(json.dumps(result_json(result)) + "\n")
    else:
        stream("\n")
    if not quiet:
        _err(summary_line(result))


def _generate_on_ranks(world: int, out, as_json: bool, quiet: bool, context=None, **options) -> None:
    """kvx generate --tensor-parallel N: the ranks run it (commands/parallel_generate.py), this process
    (rank 0) streams and prints as for one device."""
    from kvx.commands.parallel_generate import generate_on_ranks

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    answers = _Answers(context[1], write) if context is not None else None
    on_text = None if as_json else (answers.text if answers is not None else (lambda qi, piece: write(piece)))
    results = generate_on_ranks(world, context=context, on_text=on_text, **options)
    if results is None:  # another rank than 0 under torchrun: rank 0 prints
        return
    if as_json:
        if context is not None:
            write(json.dumps({"results": [result_json(r, question=q) for r, q in zip(results, context[1])]}) + "\n")
        else:
            write(json.dumps(result_json(results[0])) + "\n")
    elif answers is not None:
        answers.close()
    else:
        write("\n")
    if not quiet:
        for r in results:
            _err(summary_line(r))


def _compile(llm, quiet: bool) -> None:
    """--compile: the decode step compiled now (models/compiled_decode.py), with a note on stderr."""
    from kvx.models.compiled_decode import compile_decode

    _note("compiling the decode step (torch.compile; seconds, faster when its kernels are cached)", quiet)
    compile_decode(llm)


def _answer_from_file(path, questions, model, device, dtype, params, max_tokens, as_json, quiet, use_graphs, out,
                      compile_step=False):
    """`kvx generate --load-context FILE -q ...`: the questions answered from the stored context."""
    from kvx.context_options import check_context_memory, open_context_file, question_ids
    from kvx.runtime.contexts.resident import ResidentContext
    from kvx.runtime.contexts.run import answer_from_context

    llm, tok = load(model, device, dtype, quiet=as_json and quiet)
    if compile_step:
        _compile(llm, quiet)
    engine = build_engine(llm, tok, "full", None, None, [], use_graphs=use_graphs)
    stored = open_context_file(path, llm, tok, engine.dtype)
    ctx = ResidentContext(stored)
    ids = [question_ids(tok, stored, q) for q in questions]
    engine.check_length(stored.position + max(len(q) for q in ids))
    check_context_memory(engine, ctx, ids, max_tokens)

    def stream(text: str) -> None:
        out.write(text)
        out.flush()

    answers = _Answers(questions, stream)
    results = answer_from_context(engine, ctx, ids, params, max_tokens,
                                  on_text=None if as_json else answers.text)
    if as_json:
        stream(json.dumps({"context_file": str(path), "cached_tokens": stored.position,
                           "results": [result_json(r, question=q) for r, q in zip(results, questions)]}) + "\n")
    else:
        answers.close()
    if not quiet:
        for r in results:
            _err(summary_line(r) + f" · context from {path} ({stored.position:,} tokens, not prefilled)")


def _answer_from_file_on_ranks(world, path, questions, model, device, dtype, params, max_tokens, as_json, quiet,
                               use_graphs, out):
    """`kvx generate --load-context FILE --tp N`: each rank answers from its kv heads' share of the file."""
    from kvx.commands.parallel_contexts import answer_on_ranks

    def stream(text: str) -> None:
        out.write(text)
        out.flush()

    answers = _Answers(questions, stream)
    done = answer_on_ranks(world, path, model, device, dtype, list(questions), params, max_tokens, use_graphs,
                           on_text=None if as_json else answers.text)
    if done is None:  # another rank than 0 under torchrun: rank 0 prints
        return
    results, position = done
    if as_json:
        stream(json.dumps({"context_file": str(path), "cached_tokens": position,
                           "results": [result_json(r, question=q) for r, q in zip(results, questions)]}) + "\n")
    else:
        answers.close()
    if not quiet:
        for r in results:
            _err(summary_line(r) + f" · context from {path} ({position:,} tokens, not prefilled)")


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
    check_device_dtype("auto", dtype)
    if dtype == "auto":
        raise KvxError("--dtype: choose the stored dtype: float32, bfloat16 or float16")
    if not gguf_file.is_file():
        raise KvxError(f"GGUF file not found: {gguf_file}")
    from kvx.models.gguf import convert_gguf

    torch_dtype = resolve_dtype(dtype, "cpu")
    print(convert_gguf(gguf_file, out_dir, dtype=torch_dtype))


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
from kvx.commands.compress import compress_command  # noqa: E402
from kvx.commands.eval import eval_command  # noqa: E402
from kvx.commands.profile import profile_command  # noqa: E402
from kvx.commands.serve import serve_command  # noqa: E402

app.command("compress")(compress_command)
app.command("eval")(eval_command)
app.command("profile")(profile_command)
app.command("bench")(bench_command)
app.command("serve")(serve_command)


def main() -> None:
    """Console entry point: user errors (kvx's own and the parser's) become one line on stderr, exit code 2."""
    from kvx import usage

    try:
        code = app(standalone_mode=False, prog_name="kvx")
        if isinstance(code, int) and code:
            sys.exit(code)
    except KvxError as exc:
        _err(f"error: {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        _err("interrupted")
        sys.exit(130)
    except BrokenPipeError:  # `kvx ... | head`: the reader has all it wanted
        from kvx.inputs import silence

        silence(sys.stdout)
        sys.exit(0)
    except SystemExit:
        raise
    except Exception as exc:  # the parser's own signals and usage errors (typer's vendored click, or click)
        code = usage.exit_code(exc)
        if code is not None:
            sys.exit(code)
        if usage.is_no_args_help(exc):  # `kvx` alone: show the help, as `kvx --help` does
            print(usage.help_text(exc))
            sys.exit(0)
        line = usage.usage_error_line(exc)
        if line is not None:
            _err(f"error: {line}")
            sys.exit(2)
        if usage.is_abort(exc):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()

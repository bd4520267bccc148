"""`kvx profile`: where the memory and the time go, measured on a real run or planned from config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import typer

from kvx.errors import KvxError, about
from kvx.eval.haystack import filler_ids


@dataclass
class ProfileSettings:
    model: str | None = None
    context: int = 4096
    policy: str | None = None  # None: laprox when a budget is given, else full
    budget: str | None = None
    allocation: str | None = None
    policy_args: list[str] = field(default_factory=list)
    prompt_file: str | None = None
    decode_steps: int = 8
    device: str = "auto"
    dtype: str = "auto"
    plan_only: bool = False
    batch: int = 1
    memory: str | None = None
    tensor_parallel: int = 1  # --plan: the figures of one device of N


def profile_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model folder; with --plan also a config.json (default: SmolLM2-135M-Instruct)."),
    context: int = typer.Option(4096, "--context", "-c", help="Prompt tokens (the prompt file is cut or filled to exactly this many)."),
    policy: Optional[str] = typer.Option(None, "--policy", "-p", help="Eviction policy (default: laprox with --budget, else full)."),
    budget: Optional[str] = typer.Option(None, "--budget", "-b", help="KV budget: '5%' of all entries, or '512' tokens per kv head on average."),
    allocation: Optional[str] = typer.Option(None, "--allocation", help="Override the policy's allocator: uniform, pyramid, ada, global."),
    policy_arg: List[str] = typer.Option([], "--policy-arg", help="Policy option key=value (repeatable)."),
    prompt_file: Optional[str] = typer.Option(None, "--prompt-file", help="Prompt text (default: deterministic prose from CPython's pydoc_data)."),
    decode_steps: int = typer.Option(8, "--decode-steps", help="Decode steps to time; also the free slots per kv head kept for them."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (measured: on the CPU int8 linear weights with float32 activations and cache, as kvx generate runs; bfloat16 on a GPU; --plan: the checkpoint's), float32, bfloat16, float16."),
    as_json: bool = typer.Option(False, "--json", help="Print one kvx.profile/2 JSON object instead of tables."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: kept tokens per (layer, kv head) and kept positions along the context."),
    plan_only: bool = typer.Option(False, "--plan", help="Plan from config.json alone: no weights are loaded, nothing runs."),
    batch: int = typer.Option(1, "--batch", help="Sequences (--plan only)."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Device memory, e.g. 80GiB: report the largest context and batch that fit."),
    tensor_parallel: int = typer.Option(1, "--tensor-parallel", "--tp", help="--plan: the model split by kv head over N devices; figures (and --memory) are per device."),
) -> None:
    """Measure (or plan) the memory and time of a compressed KV cache.

    Measured: prefill, compress and decode a few steps on the model, then report weight bytes, K and V bytes full versus held after compression (per layer and per kv head), decode headroom, the memory peak during prefill and during decode, and the time of each phase.

    Planned (--plan): the same byte counts from config.json alone, and what fits in --memory.

    \b
    kvx profile --context 2048 --policy laprox --budget 5% --plot map.png
    kvx profile --plan --model config.json --context 131072 --batch 8 \\
        --budget 5% --dtype bfloat16 --memory 80GiB
    """
    settings = ProfileSettings(
        model=model, context=context, policy=policy, budget=budget, allocation=allocation,
        policy_args=list(policy_arg), prompt_file=prompt_file, decode_steps=decode_steps, device=device,
        dtype=dtype, plan_only=plan_only, batch=batch, memory=memory, tensor_parallel=tensor_parallel)
    if plot is not None:
        from kvx.commands.profile_view import check_plot_target

        check_plot_target(plot, plan_only)
    result = run_profile(settings, quiet=as_json)
    if plot is not None:
        from kvx.commands.profile_view import write_plot

        write_plot(result, plot)
    if as_json:
        print(json.dumps(result))
    else:
        from kvx.commands.profile_view import print_report

        print_report(result)


def run_profile(s: ProfileSettings, quiet: bool = False, loaded=None) -> dict:
    """The kvx.profile/2 report for these settings. `loaded` = (model, tokenizer, folder) skips loading."""
    from kvx.models.config import load_config
    from kvx.runtime.memory import parse_size, plan, resolve_plan_dtype

    from kvx.options import check_device_dtype

    check_device_dtype(s.device, s.dtype)
    if s.context <= 0:
        raise KvxError(f"--context must be a positive number of tokens, got {s.context}")
    if s.decode_steps < 0:
        raise KvxError(f"--decode-steps cannot be negative, got {s.decode_steps}")
    if s.batch <= 0:
        raise KvxError(f"--batch must be a positive number of sequences, got {s.batch}")
    with about("--memory"):
        memory = parse_size(s.memory) if s.memory is not None else None
    policy_name, pol, bud = _policy(s)

    if s.plan_only:
        if s.prompt_file is not None:
            raise KvxError("--prompt-file is for a measured run; --plan reads config.json alone")
        from kvx.runtime.profile import effective_headroom, report  # the engine, torch: after the checks

        source = _plan_source(s.model, quiet)
        cfg = load_config(source)
        dtype = resolve_plan_dtype(s.dtype, cfg)
        headroom = effective_headroom(pol, bud, s.context, s.decode_steps)
        if s.tensor_parallel != 1:
            from kvx.models.sharding import largest_share

            whole, cfg = cfg, largest_share(cfg, s.tensor_parallel)  # one device's slice
        p = plan(cfg, s.context, s.batch, bud, dtype, memory, headroom,
                 head_adaptive=pol is not None and pol.allocator.head_adaptive)
        out = report("plan", str(source), cfg, p, policy_name, s.decode_steps)
        out["notes"] = _plan_notes(p)
        if s.tensor_parallel != 1:
            out["tensor_parallel"] = s.tensor_parallel
            out["notes"].insert(0, f"per device of {s.tensor_parallel}: the one holding the most heads "
                                   f"({cfg.num_kv_heads} of {whole.num_kv_heads} kv heads, {cfg.num_heads} of "
                                   f"{whole.num_heads} query heads, 1/{s.tensor_parallel} of the MLP; the "
                                   "embedding and LM head are replicated); a batch fits when every device "
                                   "holds its share. " + (
                                       "A head-adaptive or model-wide allocation may put up to the whole budget "
                                       "on one device's heads: what a device holds, and what fits, count that "
                                       "(as admission does); the kept entries are the even share"
                                       if pol is not None and pol.allocator.head_adaptive else
                                       "Every head of a layer keeps the same count (within one), so a device "
                                       "holds its heads' share of the budget"))
        return out

    if s.tensor_parallel != 1:
        raise KvxError("--tensor-parallel applies to --plan here; measure a split run with kvx generate --tp N")

    if s.batch != 1:
        raise KvxError("--batch applies to --plan; a measured run profiles one sequence")
    text = _read_prompt(s.prompt_file) if s.prompt_file is not None else None
    from kvx.runtime.profile import effective_headroom, report  # the engine, torch: after the checks
    if loaded is None:
        from kvx.options import cpu_weight_format, resolve_device, resolve_dtype
        from kvx.models.hub import resolve_model

        dev = resolve_device(s.device)
        folder = resolve_model(s.model, quiet=quiet)
        cfg = load_config(folder)
        torch_dtype = resolve_dtype(s.dtype, dev)
        fmt = cpu_weight_format(s.dtype, dev)  # --dtype auto on the CPU: packed weights, as generate runs
    else:
        llm, tok, folder = loaded
        cfg, torch_dtype, fmt = llm.config, llm.dtype, getattr(llm, "weight_format", None)
    _check_context(s.context, cfg.max_position_embeddings)
    headroom = effective_headroom(pol, bud, s.context, s.decode_steps)
    # Planned first: a bad budget or --memory fails before the weights load.
    p = plan(cfg, s.context, 1, bud, str(torch_dtype).removeprefix("torch."), memory, headroom, weight_format=fmt)
    if loaded is None:
        from kvx.options import load

        llm, tok = load(str(folder), dev, s.dtype, quiet=True)
    from kvx.runtime.profile import measure

    ids = prompt_ids(tok, s.context, text)
    m = measure(llm, tok, ids, pol, bud, s.decode_steps)
    return report("measured", str(folder), cfg, p, policy_name, s.decode_steps, m)


def _policy(s: ProfileSettings):
    """(policy name, Policy or None, Budget or None), checked before anything is loaded."""
    from kvx.options import policy_and_budget

    pol, bud = policy_and_budget(s.policy, s.budget, s.allocation, s.policy_args)
    return (pol.name if pol is not None else "full"), pol, bud


def _plan_source(model: str | None, quiet: bool) -> Path:
    if model is not None:
        from kvx.models.hf_hub import parse_hub_id, resolve_hub_model

        path, hub_id = Path(model).expanduser(), parse_hub_id(model)
        if not path.exists() and hub_id is not None:  # --plan reads config.json alone: fetch only that
            return resolve_hub_model(*hub_id, quiet=quiet, files=["config.json"])
        return path
    from kvx.models.hub import pull_default_model

    return pull_default_model(quiet=quiet)


def _check_context(context: int, limit: int) -> None:
    if context > limit:
        raise KvxError(f"--context {context} is longer than the model's context ({limit} tokens)")


def _plan_notes(p) -> list[str]:
    notes = []
    if p.context > p.model_context:
        notes.append(f"--context {p.context} is longer than the model's context ({p.model_context} tokens)")
    if p.kv_entries_kept < p.kv_entries_full:
        notes.append("the prompt is prefilled whole before it is compressed: while a sequence is prefilled its "
                     "full cache exists, so the budget lowers what is held afterwards, not the prefill peak")
    return notes


def _read_prompt(path: str) -> str:
    from kvx.inputs import read_text_file

    text = read_text_file(path, "prompt")
    if not text.strip():
        raise KvxError(f"prompt file is empty: {path}")
    return text


def prompt_ids(tokenizer, n_tokens: int, text: str | None = None) -> list[int]:
    """Exactly n_tokens ids: the text's (cut to n_tokens), then deterministic filler prose up to n_tokens."""
    ids = tokenizer.encode(text, add_special_tokens=True) if text is not None else []
    if len(ids) < n_tokens:
        ids += filler_ids(tokenizer, n_tokens - len(ids), first=not ids)
    return ids[:n_tokens]



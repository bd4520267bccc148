"""Option values to runtime objects: the helpers every front end shares (generate, jsonl, serve, eval,
bench, profile). Nothing here prints; errors are KvxError.

Lives below the commands so that `kvx/cli.py`, `kvx/commands/*`, the JSONL pipeline and the server all
import it and none of them imports another.
"""

from __future__ import annotations

from typing import Optional

from kvx.errors import KvxError


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise KvxError("--device cuda was asked for but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise KvxError(f"unknown device {device!r}: use auto, cpu or cuda")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        # float32 on the CPU: bfloat16 matmuls are slower there at long context.
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in table:
        raise KvxError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return table[dtype]


def load(model: Optional[str], device: str, dtype: str, quiet: bool = False):
    """Resolve, (pull,) and load a model: returns (model, tokenizer)."""
    from kvx.models import load_model
    from kvx.models.hub import resolve_model

    dev = resolve_device(device)
    path = resolve_model(model, quiet=quiet)
    return load_model(path, device=dev, dtype=resolve_dtype(dtype, dev))


def parse_policy_args(items: list[str]) -> dict[str, str]:
    args = {}
    for item in items:
        for part in item.split(","):
            if not part:
                continue
            if "=" not in part:
                raise KvxError(f"--policy-arg expects key=value, got {part!r}")
            key, value = part.split("=", 1)
            args[key.strip()] = value.strip()
    return args


def policy_and_budget(policy: str, budget: Optional[str], allocation: Optional[str], policy_args: list[str],
                      prefill_chunk: Optional[int] = None):
    """The Policy and Budget the options ask for, or (None, None) for the uncompressed runtime.

    Cheap (no model), so commands call it before loading one: a bad option fails at once.
    """
    if prefill_chunk is not None and prefill_chunk <= 0:
        raise KvxError("--prefill-chunk must be a positive number of tokens")
    if policy == "full" and budget is None and not allocation and not policy_args:
        return None, None
    from kvx.policies import build_policy, parse_budget

    if policy != "full" and budget is None:
        raise KvxError(f"--policy {policy} needs a --budget (e.g. --budget 10% or --budget 512)")
    pol = build_policy(policy, allocation=allocation, args=parse_policy_args(policy_args))
    bud = parse_budget(budget) if budget is not None else None
    return pol, bud


def build_engine(model, tokenizer, policy: str, budget: Optional[str], allocation: Optional[str], policy_args: list[str],
                 use_graphs: bool = True, prefill_chunk: Optional[int] = None):
    from kvx.runtime.engine import Engine

    pol, bud = policy_and_budget(policy, budget, allocation, policy_args, prefill_chunk)
    if pol is None:
        return Engine(model, tokenizer, use_graphs=use_graphs)  # the uncompressed runtime
    return Engine(model, tokenizer, policy=pol, budget=bud, use_graphs=use_graphs, prefill_chunk=prefill_chunk)


def chat_prompt(tokenizer, user: str, system: Optional[str], raw: bool) -> str:
    if raw or not tokenizer.has_chat_template:
        return user
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def split_context_question(tokenizer, context: str, question: str, system: Optional[str], raw: bool) -> tuple[list[int], list[int]]:
    """Token ids of the context part and the question part of one chat turn, split where the question starts."""
    from kvx.models.tokenizer import split_chat_turn

    if raw or not tokenizer.has_chat_template:
        head, tail = context + "\n\n", question
    else:
        head, tail = split_chat_turn(tokenizer, context + "\n\n", question, system)
    return tokenizer.encode(head, add_special_tokens=True), tokenizer.encode(tail, add_special_tokens=False)


def encode_prompt(tokenizer, prompt: str, system: Optional[str], raw: bool) -> list[int]:
    text = chat_prompt(tokenizer, prompt, system, raw)
    return tokenizer.encode(text, add_special_tokens=raw or not tokenizer.has_chat_template)


def parse_memory(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '123456' -> bytes (KvxError otherwise): what --kv-memory takes."""
    from kvx.runtime.memory import parse_size

    return parse_size(text)


# Without --kv-memory the KV pool takes this share of what is free, capped on the CPU: the weights,
# activations and the rest of the machine need the remainder.
_KV_SHARE_CPU, _KV_CAP_CPU = 0.25, 4 * 2**30
_KV_SHARE_GPU = 0.6


def default_kv_memory(device: str) -> int:
    """Bytes for the KV pool when --kv-memory is not given: min(4 GiB, 1/4 of MemAvailable) on the CPU,
    60% of the free device memory (after the weights are loaded) on a GPU."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free * _KV_SHARE_GPU)
    return int(min(_KV_CAP_CPU, _mem_available() * _KV_SHARE_CPU))


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    try:  # not Linux: all physical memory, a looser bound
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return _KV_CAP_CPU * 4

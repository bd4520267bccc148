"""Option values to runtime objects: the helpers every front end shares (generate, jsonl, serve, eval,
bench, profile). Nothing here prints; errors are KvxError.

Lives below the commands so that `kvx/cli.py`, `kvx/commands/*`, the JSONL pipeline and the server all
import it and none of them imports another.
"""

from __future__ import annotations

from typing import Optional

from kvx.errors import KvxError, about

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# What `--budget` alone compresses with: a budget is never silently ignored (stated in --help and the summary).
DEFAULT_POLICY = "laprox"


def check_device_dtype(device: str, dtype: str) -> None:
    """The names alone, without importing torch: commands call this first, so a typo fails at once."""
    if device not in DEVICES:
        raise KvxError(f"--device: unknown device {device!r}; use auto, cpu or cuda")
    if dtype not in DTYPES:
        raise KvxError(f"--dtype: unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")


def resolve_device(device: str) -> str:
    import torch

    check_device_dtype(device, "auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise KvxError("--device cuda was asked for but no CUDA device is available")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    check_device_dtype("auto", dtype)
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        # float32 on the CPU (activations and cache; `load` packs the linear weights: models/cpu_weights.py).
        return torch.float32 if device == "cpu" else torch.bfloat16
    return table[dtype]


def load(model: Optional[str], device: str, dtype: str, quiet: bool = False):
    """Resolve, (pull,) and load a model: returns (model, tokenizer)."""
    from kvx.models import load_model
    from kvx.models.hub import resolve_model

    path = resolve_model(model, quiet=quiet)  # first: a bad path fails before torch is even imported
    dev = resolve_device(device)
    fmt = cpu_weight_format(dtype, dev)  # a bad KVX_CPU_WEIGHTS fails before the model loads
    llm, tok = load_model(path, device=dev, dtype=resolve_dtype(dtype, dev))
    if fmt != "float32":
        from kvx.models.cpu_weights import pack

        pack(llm, fmt, calibration_for(llm, tok) if fmt == "w8a8" else None)
    return llm, tok


def load_rank(path: str, tp, device: str, dtype: str):
    """A tensor-parallel rank's (model, tokenizer): its slices of the weights (models/sharding.py), packed
    as `load` packs one device's (--dtype auto on the CPU: int8, each row's scale the whole row's)."""
    from kvx.models.sharding import load_sharded

    llm, tok = load_sharded(path, tp.rank, tp.world, tp, device=tp.device, dtype=resolve_dtype(dtype, device))
    fmt = cpu_weight_format(dtype, str(tp.device))
    if fmt != "float32":
        from kvx.models.cpu_weights import pack

        pack(llm, fmt)
    return llm, tok


CALIBRATION_TOKENS = 512  # of fixed English prose: w8a8's smoothing (~1 s of float32 prefill on 2 cores)


def calibration_for(llm, tok):
    """What models/cpu_weights.calibrate measures over a fixed prose passage (the same on every run)."""
    import torch

    from kvx.eval.haystack import filler_ids
    from kvx.models.cpu_weights import calibrate

    ids = filler_ids(tok, CALIBRATION_TOKENS)[:CALIBRATION_TOKENS]
    return calibrate(llm, torch.tensor(ids, dtype=torch.long))


def cpu_weight_format(dtype: str, device: str) -> str:
    """What the linear weights are stored as: `--dtype auto` on the CPU packs them (KVX_CPU_WEIGHTS, int8
    by default: models/cpu_weights.py) while activations, norms and the KV cache stay float32; any explicit
    --dtype, and every GPU run, keeps the weights in that dtype ('float32' here means: nothing packed)."""
    from kvx.models.cpu_weights import resolve_format

    return resolve_format() if dtype == "auto" and device == "cpu" else "float32"


def parse_policy_args(items: list[str]) -> dict[str, str]:
    args = {}
    for item in items:
        for part in item.split(","):
            if not part:
                continue
            if "=" not in part or not part.split("=", 1)[0].strip():
                raise KvxError(f"--policy-arg expects key=value, got {part!r}")
            key, value = part.split("=", 1)
            args[key.strip()] = value.strip()
    return args


def policy_name(policy: Optional[str], budget: Optional[str]) -> str:
    """The policy the options mean: none given is the full cache, or DEFAULT_POLICY when a budget is."""
    if policy is None:
        return DEFAULT_POLICY if budget is not None else "full"
    return policy


def check_prefill_step(prefill_step: Optional[int]) -> None:
    """--prefill-step (the batched engine's split prefill): a positive number of tokens, or unset."""
    if prefill_step is not None and prefill_step <= 0:
        raise KvxError(f"--prefill-step must be a positive number of tokens, got {prefill_step}")


def policy_and_budget(policy: Optional[str], budget: Optional[str], allocation: Optional[str],
                      policy_args: list[str], prefill_chunk: Optional[int] = None):
    """The Policy and Budget the options ask for, or (None, None) for the uncompressed runtime.

    Cheap (no model), so commands call it before loading one: a bad option fails at once, naming it.
    """
    from kvx.policies.budget import parse_budget

    # The checks that need no policy code come first: policy code imports torch, which takes seconds.
    if prefill_chunk is not None and prefill_chunk <= 0:
        raise KvxError(f"--prefill-chunk must be a positive number of tokens, got {prefill_chunk}")
    name = policy_name(policy, budget)
    with about("--budget"):
        bud = parse_budget(budget) if budget is not None else None
    args = parse_policy_args(policy_args)
    if name.strip().lower() == "full":
        # The full cache keeps everything: a budget, allocator or option given with it would be ignored.
        given = [o for o, v in (("--budget", budget), ("--allocation", allocation), ("--policy-arg", args)) if v]
        if given:
            raise KvxError(f"--policy full keeps every entry and takes no {' or '.join(given)}; "
                           f"pick a policy that compresses (see `kvx policies`), e.g. --policy {DEFAULT_POLICY}")
        return None, None
    from kvx.policies.registry import ALLOCATOR_NAMES, build_policy

    with about("--policy"):
        pol = build_policy(name)
    if allocation is not None and str(allocation).strip().lower() not in ALLOCATOR_NAMES:
        raise KvxError(f"--allocation: unknown allocation {allocation!r}; choose one of: {', '.join(ALLOCATOR_NAMES)}")
    if bud is None:
        raise KvxError(f"--policy {pol.name} needs a --budget (e.g. --budget 10% or --budget 512)")
    with about("--policy-arg"):
        pol = build_policy(name, allocation=allocation, args=args)
    return pol, bud


def check_sampling(params, name=lambda field: "--" + field.replace("_", "-")):
    """The sampling parameters, or KvxError naming the bad one (`name` turns a field into its option)."""
    from kvx.runtime.engine.sampling import sampling_problem

    problem = sampling_problem(params)
    if problem is not None:
        field, text = problem
        raise KvxError(f"{name(field)} {text}")
    return params


def build_engine(model, tokenizer, policy: str, budget: Optional[str], allocation: Optional[str], policy_args: list[str],
                 use_graphs: bool = True, prefill_chunk: Optional[int] = None):
    from kvx.runtime.engine.model_runner import ModelRunner

    pol, bud = policy_and_budget(policy, budget, allocation, policy_args, prefill_chunk)
    if pol is None:
        return ModelRunner(model, tokenizer, use_graphs=use_graphs)  # the uncompressed runtime
    return ModelRunner(model, tokenizer, policy=pol, budget=bud, use_graphs=use_graphs, prefill_chunk=prefill_chunk)


# Below this many kept tokens per kv head (SnapKV's observation window alone is 32) a compressed prompt
# loses its meaning on any model: worth a word to the user, who likely meant a long prompt.
FEW_KEPT_TOKENS = 32


def short_prompt_note(engine, prompt_tokens: int) -> Optional[str]:
    """A note for stderr when the budget leaves a prompt only a handful of tokens per kv head."""
    pol, bud = engine.policy, engine.budget
    if pol is None or pol.name == "full" or bud is None or bud.keeps_everything(prompt_tokens):
        return None
    cfg = engine.config
    per_head = bud.total_entries(prompt_tokens, cfg.num_layers, cfg.num_kv_heads) / (cfg.num_layers * cfg.num_kv_heads)
    if per_head >= FEW_KEPT_TOKENS:
        return None
    return (f"note: --budget {bud} of this {prompt_tokens}-token prompt keeps about {per_head:.0f} tokens per kv "
            "head; compression is for long prompts, and at this length it costs the answer its meaning and saves "
            "little memory (a larger --budget, or leave it out)")


_ENGINES = object()  # memory_need's default: the engine's own policy, budget or chunk


def memory_need(engine, prompt_tokens: int, max_tokens: int, question_tokens: int = 0, policy=_ENGINES,
                budget=_ENGINES, prefill_chunk=_ENGINES):
    """What generating from a prompt of `prompt_tokens` can hold at its peak (kvx.runtime.memory.Need): the
    engine's own memory model, the blocks its scheduler reserves for the request's worst case
    (scheduler.worst_case_blocks) times the bytes a block occupies, plus prefill activations on a GPU.
    `policy`, `budget` and `prefill_chunk` default to the engine's own."""
    from kvx.runtime.memory import Need, prefill_activation_bytes
    from kvx.runtime.cache.pool import DEFAULT_BLOCK_SIZE, pool_block_bytes
    from kvx.runtime.engine.scheduler import worst_case_blocks

    cfg, n = engine.config, prompt_tokens
    budget = engine.budget if budget is _ENGINES else budget
    chunk = engine.prefill_chunk if prefill_chunk is _ENGINES else prefill_chunk
    pol = engine.policy if policy is _ENGINES else policy
    new = max(0, min(max_tokens, cfg.max_position_embeddings - n - question_tokens))
    blocks = worst_case_blocks(cfg, DEFAULT_BLOCK_SIZE, n, question_tokens, new, pol, budget,
                               agnostic=question_tokens > 0, prefill_chunk=chunk)
    nbytes = engine.entry_bytes() // (2 * cfg.head_dim)
    chunked = bool(chunk and chunk < n and pol is not None and budget is not None and not budget.keeps_everything(n))
    act = prefill_activation_bytes(cfg, chunk if chunked else n, nbytes) if engine.device.type == "cuda" else 0
    return Need(kv_bytes=blocks * pool_block_bytes(DEFAULT_BLOCK_SIZE, cfg.head_dim, engine.dtype),
                activation_bytes=act)


def check_memory(engine, prompt_tokens: int, max_tokens: int, question_tokens: int = 0,
                 available: Optional[int] = None, policy=_ENGINES, budget=_ENGINES, kv_in_pool: bool = False) -> None:
    """Refuse, before the prefill, a request whose cache (and, on a GPU, activations) would not fit in the
    device's free memory, saying how much it needs and how much there is, and suggesting a per-head
    --budget with --prefill-chunk that would fit. `available` overrides the measured figure; `policy` and
    `budget` the engine's (a --jsonl line's own). kv_in_pool: the cache lives in a pool already allocated
    (--jsonl), so only the activations are compared with what is free."""
    from kvx.runtime.memory import check_fits

    n = prompt_tokens
    own_policy = engine.policy if policy is _ENGINES else policy
    own_budget = engine.budget if budget is _ENGINES else budget
    # The policy the suggestion is for: the one given, unless it cannot prefill in chunks (its score needs
    # every query: h2o), else the one --budget alone picks.
    chunkable = own_policy is not None and not own_policy.request.colsum_all
    suggest = "" if chunkable or own_policy is None else f"--policy {DEFAULT_POLICY} "

    def need(policy=own_policy, budget=own_budget, chunk=_ENGINES):
        return memory_need(engine, n, max_tokens, question_tokens, policy, budget, chunk)

    def fitting_budget(free: int, chunk: int) -> int:
        """The largest per-head token budget that fits with this chunk (0: none). What a budget of B tokens
        needs grows linearly in B: solve from B = 1 and 2, then step down to be sure."""
        from kvx.policies import Budget, build_policy

        pol = own_policy if chunkable else build_policy(DEFAULT_POLICY)
        one, two = need(pol, Budget(tokens=1), chunk).total, need(pol, Budget(tokens=2), chunk).total
        tokens = min(n - 1, 1 + (free - one) // max(1, two - one))
        while tokens >= 1 and need(pol, Budget(tokens=tokens), chunk).total > free:
            tokens -= max(1, tokens // 100)
        return max(0, tokens)

    def hint(free: int) -> str:
        # The largest chunk (the one given, else 512; then halves down to 16) that still allows half the
        # best budget: smaller chunks leave more room for the budget but prefill more slowly.
        first = engine.prefill_chunk or 512
        chunks = [first] + [c for c in (512 >> i for i in range(6)) if c < first]
        budgets = {chunk: fitting_budget(free, chunk) for chunk in chunks}
        best = max(budgets.values())
        if best < 1:
            return "try a shorter prompt or fewer --max-tokens"
        chunk = next(c for c in chunks if budgets[c] * 2 >= best)
        return f"try {suggest}--budget {budgets[chunk]} --prefill-chunk {chunk} (tokens per kv head), or a shorter prompt"

    if kv_in_pool:
        from kvx.runtime.memory import Need

        check_fits(Need(kv_bytes=0, activation_bytes=need().activation_bytes), engine.device, available)
        return
    check_fits(need(), engine.device, available, hint)


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


def parse_memory(text: str, option: str = "--kv-memory") -> int:
    """'2GiB', '512MiB', '1.5GB', '123456' -> bytes (a KvxError naming the option otherwise)."""
    from kvx.runtime.memory import parse_size

    with about(option):
        return parse_size(text)


# `kvx generate` options that only tune the batched run of --jsonl (name, whether it was given).
def check_jsonl_only(jsonl: bool, given: dict[str, bool]) -> None:
    used = [name for name, was_given in given.items() if was_given]
    if used and not jsonl:
        raise KvxError(f"{', '.join(used)} only {'applies' if len(used) == 1 else 'apply'} to --jsonl (the "
                       "batched run of many requests); a single prompt runs alone")


def default_kv_memory(device) -> int:
    """Bytes for the KV pool when --kv-memory is not given (kvx.runtime.cache.pool.default_kv_memory)."""
    from kvx.runtime.cache.pool import default_kv_memory as pool_default

    return pool_default(device)

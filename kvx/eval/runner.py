"""`kvx eval`'s loop: samples x (policy, budget) pairs, one shared prefill per sample, rows to a JSONL file.

For every sample the prompt is prefilled once (eval.prefill.SharedPrefill) and every pair forks it:
`fork -> compress -> answer`. The full cache is always evaluated too, as policy "full" at budget 100%.

Modes:
- agnostic (default, as kvpress): the chat-template prefix + context is prefilled and compressed, then the
  question and the answer prefix are appended and the answer decoded. The cache cannot know the question.
- aware: the whole prompt (context, question, answer prefix) is prefilled, compressed, then decoded.
- aware-plain: as aware, but the prompt ends with the plain question and the assistant header, with no
  answer prefix (RULER's "The pass key is" would hand the observation window the answer's position): the
  prompt a user typing one question sends.

Samples: `samples` seeds per task (seed, seed + 1, ...); sample i puts its needle at depth
depth_sweep(depths)[i % depths], so depths cycle through 0..100% evenly. Tasks without a needle ignore it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from kvx.errors import KvxError, about
from kvx.eval import tasks as task_gen
from kvx.eval.prompt import PromptIds, build_prompt, prompt_text
from kvx.eval.results import ResultsFile, row_key
from kvx.eval.scoring import score_sample

MODES = ("agnostic", "aware", "aware-plain")
FULL = "full"
FULL_BUDGET = "100%"
# Tasks whose generator ignores the needle depth (they hide no needle): their rows record depth None.
NEEDLELESS_TASKS = frozenset({"common_words", "frequent_words"})


@dataclass
class EvalConfig:
    tasks: list[str]
    context: int
    policies: list[str]
    budgets: list[str]
    samples: int
    mode: str = "agnostic"
    haystack: str = "noise"
    max_tokens: int = 32
    seed: int = 0
    depths: int = 5
    fidelity: bool = False  # also teacher-force question + full answer: KL / top-1 / layer errors per row
    max_batch: int = 16  # answers decoded together per sample (1: one variant after another)
    model: str = ""  # recorded in every row; a results file holds one model's rows
    dtype: str = ""

    def validate(self) -> None:
        from kvx.eval.haystack import HAYSTACKS

        self.tasks = [canonical_task(t) for t in self.tasks]
        if not self.tasks:
            raise KvxError("--task: no task given; choose from: " + ", ".join(task_gen.TASKS))
        if self.mode not in MODES:
            raise KvxError(f"--mode: unknown mode {self.mode!r}; use agnostic, aware or aware-plain")
        if self.haystack not in HAYSTACKS:
            raise KvxError(f"--haystack: unknown haystack {self.haystack!r}; choose one of: {', '.join(HAYSTACKS)}")
        if self.samples < 1:
            raise KvxError(f"--samples must be at least 1, got {self.samples}")
        if self.context < 1:
            raise KvxError(f"--context must be a positive number of tokens, got {self.context}")
        if self.max_tokens < 1:
            raise KvxError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.depths < 1:
            raise KvxError(f"--depths must be at least 1, got {self.depths}")
        from kvx.policies.budget import parse_budget

        with about("--budgets"):  # here too, so that a bad budget fails before any policy code loads
            for text in self.budgets:
                parse_budget(text)


def canonical_task(name: str) -> str:
    key = task_gen._ALIASES.get(name.strip(), name.strip())
    if key not in task_gen.TASKS:
        raise KvxError(f"--task: unknown task {name!r}; choose from: {', '.join(task_gen.TASKS)}")
    return key


@dataclass(frozen=True)
class SampleSpec:
    task: str
    seed: int
    depth: float | None  # None for tasks without a needle


def sample_specs(config: EvalConfig) -> list[SampleSpec]:
    sweep = task_gen.depth_sweep(config.depths)
    return [SampleSpec(task, config.seed + i, None if task in NEEDLELESS_TASKS else sweep[i % len(sweep)])
            for task in config.tasks for i in range(config.samples)]


@dataclass
class Variant:
    """One (policy, budget) of the grid: the names that go in the rows, and the objects that run it."""

    policy_name: str
    budget_label: str
    policy: object = None  # kvx.policies.Policy; None for the full cache and for baselines
    budget: object = None  # kvx.policies.Budget
    baseline: object = None  # an external runner (kvpress) when not None
    silent: bool = False  # run for the fidelity continuation only: its row is already in the results


def kvx_variants(config: EvalConfig) -> list[Variant]:
    """The full cache, then every policy at every budget (policies and budgets checked here)."""
    from kvx.policies.budget import parse_budget

    with about("--budgets"):
        budgets = [parse_budget(b) for b in config.budgets]
    if not budgets and any(p != FULL for p in config.policies):
        raise KvxError("--budgets: no budget given; use e.g. --budgets 5%,10%,25%,50%")
    from kvx.policies.registry import build_policy, parse_policy_spec, policy_label

    out = [Variant(FULL, FULL_BUDGET)]
    seen = {(FULL, FULL_BUDGET)}
    for spec in config.policies:
        with about("--policies"):
            name, args = parse_policy_spec(spec)
            policy = build_policy(name, args=args)
        if policy.name == FULL:
            continue  # the full cache is always there
        label = policy_label(policy.name, args)
        for budget in budgets:
            if (label, str(budget)) not in seen:
                seen.add((label, str(budget)))
                out.append(Variant(label, str(budget), build_policy(name, args=args), budget))
    return out


def _key(config: EvalConfig, spec: SampleSpec, variant: Variant) -> tuple:
    return row_key({"task": spec.task, "context": config.context, "haystack": config.haystack,
                    "seed": spec.seed, "depth": spec.depth, "mode": config.mode,
                    "policy": variant.policy_name, "budget": variant.budget_label})


@dataclass
class Plan:
    """What a run still has to do: per sample, the variants whose rows are missing from the results."""

    work: list[tuple[SampleSpec, list[Variant]]] = field(default_factory=list)
    grid_keys: list[tuple] = field(default_factory=list)

    @property
    def units(self) -> int:
        return sum(len(v) for _, v in self.work)


def make_plan(config: EvalConfig, variants: list[Variant], results: ResultsFile) -> Plan:
    plan = Plan()
    for spec in sample_specs(config):
        todo = []
        for v in variants:
            key = _key(config, spec, v)
            plan.grid_keys.append(key)
            if key not in results:
                todo.append(v)
        if todo:
            plan.work.append((spec, todo))
    return plan


def check_results_match(config: EvalConfig, results: ResultsFile) -> None:
    """Refuse to mix models (or dtypes) in one results file: resumed rows would silently be another model's."""
    for row in results.rows:
        for field_name in ("model", "dtype"):
            have, want = row.get(field_name), getattr(config, field_name)
            if have and want and have != want:
                raise KvxError(f"{results.path} holds results of {field_name} {have}, not {want}; "
                               "use another --out")


def run_eval(engine, config: EvalConfig, results: ResultsFile, baselines: list | None = None,
             on_start: Callable[[int], None] | None = None,
             on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Run every missing row of the grid, appending each to `results`; returns all the grid's rows."""
    config.validate()
    check_results_match(config, results)
    variants = kvx_variants(config)
    for baseline in baselines or []:
        variants += [Variant(p, b, baseline=baseline) for p, b in baseline.pairs(config.budgets)]
    plan = make_plan(config, variants, results)
    if on_start is not None:
        on_start(plan.units)
    tokenizer = engine.tokenizer
    for spec, todo in plan.work:
        sample = task_gen.generate(spec.task, tokenizer, config.context, spec.seed, spec.depth, config.haystack)
        prompt = build_prompt(tokenizer, sample, answer_prefix=config.mode != "aware-plain")

        def emit(row: dict) -> None:
            results.append(row)
            if on_row is not None:
                on_row(row)

        own = [v for v in todo if v.baseline is None]
        if own:
            evaluate_sample(engine, config, sample, prompt, own, emit)
        theirs = [v for v in todo if v.baseline is not None]
        for baseline in {id(v.baseline): v.baseline for v in theirs}.values():
            # One prefill of the sample for all of this baseline's presses x budgets, as for kvx's own.
            shared = baseline.prefill(prompt_text(sample, tokenizer, config.mode != "aware-plain"),
                                      aware=config.mode != "agnostic")
            for v in theirs:
                if v.baseline is baseline:
                    emit(_baseline_row(config, sample, prompt, v, shared))
    wanted = set(plan.grid_keys)
    return [r for r in results.rows if row_key(r) in wanted]


def evaluate_sample(engine, config: EvalConfig, sample, prompt: PromptIds, variants: list[Variant],
                    emit: Callable[[dict], None]) -> None:
    """One shared prefill of the sample, then fork -> compress -> answer for every variant."""
    # Imported here, not at the top: `kvx eval` checks its options through this module before torch loads.
    from kvx.eval.prefill import SharedPrefill

    agnostic = config.mode == "agnostic"
    prefill_ids = prompt.context if agnostic else prompt.full
    engine.check_length(len(prompt.full))
    max_tokens = min(config.max_tokens, engine.config.max_position_embeddings - len(prompt.full))
    if max_tokens < 1:
        raise KvxError(f"the prompt ({len(prompt.full)} tokens) leaves no room to answer in the model's "
                       f"context of {engine.config.max_position_embeddings} tokens; use a smaller --context")
    # With fidelity on, the full cache's answer is the continuation every policy is compared on.
    if config.fidelity and not any(v.policy_name == FULL for v in variants):
        variants = [Variant(FULL, FULL_BUDGET, silent=True)] + variants
    shared = SharedPrefill(engine, prefill_ids, [(v.policy, v.budget) for v in variants if v.policy is not None])
    _answer_variants(engine, config, sample, prompt, variants, shared, max_tokens, emit)


def _answer_variants(engine, config: EvalConfig, sample, prompt: PromptIds, variants: list[Variant], shared,
                     max_tokens: int, emit: Callable[[dict], None]) -> None:
    """Every variant compressed from the shared prefill straight into the batched engine's pool (only its
    kept entries are copied) and all answers decoded together, --max-batch at a time: a request's output
    in a batch is its output alone, with fewer passes over the weights."""
    from kvx.eval.fidelity import compare_on_continuation
    from kvx.runtime.engine.batch_engine import BatchEngine
    from kvx.runtime.cache.pool import DEFAULT_BLOCK_SIZE, pool_block_bytes
    from kvx.runtime.engine.scheduler import held_blocks
    from kvx.runtime.engine.sequence import GenerationRequest

    agnostic = config.mode == "agnostic"
    cfg = engine.config
    n = len(prompt.context if agnostic else prompt.full)
    longest = len(prompt.question) if agnostic else 0
    ordered = sorted(variants, key=lambda v: v.policy_name != FULL)
    results, prepared = {}, []
    for start in range(0, len(ordered), config.max_batch):
        group = ordered[start:start + config.max_batch]
        # The pool holds each variant's compressed cache at its largest (the scheduler's own model).
        blocks = sum(held_blocks(cfg, DEFAULT_BLOCK_SIZE, n, longest, max_tokens, v.policy, v.budget, agnostic)
                     for v in group)
        batch = BatchEngine(engine, blocks * pool_block_bytes(DEFAULT_BLOCK_SIZE, cfg.head_dim, engine.dtype),
                            max_batch=config.max_batch)
        seqs = []
        for v in group:
            t0 = time.perf_counter()
            req = shared.fork(v.policy, v.budget)
            engine.compress(req, headroom=0 if agnostic else max_tokens, pool=batch.pool)
            request = (GenerationRequest(context_ids=prompt.context, question_ids=[prompt.question],
                                         max_tokens=max_tokens) if agnostic
                       else GenerationRequest(prompt_ids=prompt.full, max_tokens=max_tokens))
            prepared.append((v, time.perf_counter() - t0, req.lengths_after_compress))
            seqs.append((v, batch.adopt(req, request, None if agnostic else shared.logits)))
        batch.run()
        for v, seq in seqs:
            if seq.error is not None:
                raise (RuntimeError if seq.internal else KvxError)(seq.error)
            results[id(v)] = seq.results[0]
    full_answer = next((list(results[id(v)].token_ids) for v, *_ in prepared if v.policy_name == FULL), None)
    for v, prep_s, lengths in prepared:
        if v.silent:
            continue
        result = results[id(v)]
        row = _row(config, sample, v, result.text, engine, n, lengths, result, prep_s + result.timings.decode_s)
        if config.fidelity and v.policy_name != FULL:
            continuation = (prompt.question if agnostic else []) + (full_answer or [])
            row["fidelity"] = compare_on_continuation(engine, shared, continuation, v.policy, v.budget).to_dict()
        emit(row)


def _row(config: EvalConfig, sample, v: Variant, prediction: str, engine, n_compressed: int,
         lengths: list[list[int]], result, wall: float) -> dict:
    from kvx.runtime.parallel.totals import whole_model

    cfg = engine.config
    entry = engine.entry_bytes()
    timings = {k: round(val, 6) for k, val in vars(result.timings).items()}
    timings["wall_s"] = round(wall, 6)
    return {
        **_sample_fields(config, sample),
        "policy": v.policy_name,
        "budget": v.budget_label,
        "score": score_sample(sample, prediction),
        "prediction": prediction,
        "answers": list(sample.answers),
        "kv_bytes_held": whole_model(getattr(engine, "model", None), [sum(map(sum, lengths))])[0] * entry,
        "kv_bytes_full": cfg.num_layers * (cfg.model_kv_heads or cfg.num_kv_heads) * n_compressed * entry,
        "kv_bytes_peak": result.kv_bytes_peak,
        "prompt_tokens": result.prompt_tokens,
        "generated_tokens": result.generated_tokens,
        "finish_reason": result.finish_reason,
        "timings": timings,
    }


def _sample_fields(config: EvalConfig, sample) -> dict:
    return {
        "task": sample.task,
        "context": config.context,
        "context_tokens": sample.n_tokens,
        "haystack": config.haystack,
        "depth": sample.depth,
        "seed": sample.seed,
        "mode": config.mode,
        "model": config.model,
        "dtype": config.dtype,
        "max_tokens": config.max_tokens,
    }


def _baseline_row(config: EvalConfig, sample, prompt: PromptIds, v: Variant, shared) -> dict:
    try:
        answer = shared.answer(v.policy_name, v.budget_label, max_tokens=config.max_tokens)
    except Exception as exc:  # noqa: BLE001 - another library's failure is a result to record, not a crash
        # e.g. kvpress's PyramidKV leaves layers of different lengths, which transformers' sdpa and eager
        # attention masks cannot take (only flash-attention can): that press has no answer on this machine.
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return {**_sample_fields(config, sample), "policy": v.policy_name, "budget": v.budget_label,
                "score": None, "error": message, "answers": list(sample.answers)}
    return {
        **_sample_fields(config, sample),
        "policy": v.policy_name,
        "budget": v.budget_label,
        "score": score_sample(sample, answer.prediction),
        "prediction": answer.prediction,
        "answers": list(sample.answers),
        "kv_bytes_held": answer.kv_bytes_held,
        "kv_bytes_full": answer.kv_bytes_full,
        "prompt_tokens": len(prompt.full),
        "generated_tokens": answer.generated_tokens,
        "timings": {k: round(val, 6) for k, val in answer.timings.items()},
    }

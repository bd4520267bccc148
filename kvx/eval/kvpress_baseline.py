"""`kvx eval --against kvpress`: NVIDIA kvpress's presses on the same prompts, model folder and budgets.

kvpress (github.com/NVIDIA/kvpress) compresses a transformers DynamicCache with forward hooks during the
prefill. We follow its documented pipeline, "kv-press-text-generation", which is question-agnostic
like kvx's default mode (for kvx's aware mode the question moves into the context, as kvpress's query-aware
evaluation does): it renders the chat template around the context, prefills and compresses the
context alone, then appends the question (still inside the user turn), the assistant header and the answer
prefix, and decodes greedily. We give it the sample's context, "\\n\\n" + question and answer prefix, so the
prompt text is token for token the one kvx reads (eval.prompt).

Budgets: kvpress's `compression_ratio` is the share of context tokens *removed*, so a kvx budget of 10%
is compression_ratio 0.9; a token budget (512 per kv head) is 1 - 512 / context tokens.

kv_bytes_held is what kvpress's cache really allocates after compression. Head-wise presses (AdaKV)
only mask the evicted keys, so their cache does not shrink; the rows say so.

One prefill per sample, as kvx does (`KvpressBaseline.prefill`): a press runs as a forward hook *after*
each attention layer has attended over the whole context, so what it compresses never changes what the
next layer sees. We therefore run the context once, record every attention layer's hook arguments, and
replay each press's own `forward_hook` on a copy of the full cache; then the pipeline's own
`generate_answer` answers. tests/test_kvpress.py checks this against the pipeline, answer for answer and
cache for cache. `KvpressBaseline.answer` runs the pipeline itself, one prefill per press; KVzipPress,
which makes its own reconstruction passes after the prefill, always goes that way (OWN_PIPELINE). The
KVzipPress rows are untested against kvpress here (kvpress was not installed where they were written).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvx.errors import KvxError

PREFIX = "kvpress:"
FULL_BUDGET = "100%"


def _snapkv(kp, ratio):
    return kp.SnapKVPress(compression_ratio=ratio)


# kvx policy name -> kvpress press of the same method (kvpress's own defaults otherwise).
PRESSES = {
    "snapkv": _snapkv,
    "ada-snapkv": lambda kp, ratio: kp.AdaKVPress(_snapkv(kp, ratio)),
    "expected-attention": lambda kp, ratio: kp.ExpectedAttentionPress(compression_ratio=ratio),
    "tova": lambda kp, ratio: kp.TOVAPress(compression_ratio=ratio),
    "knorm": lambda kp, ratio: kp.KnormPress(compression_ratio=ratio),
    "streaming": lambda kp, ratio: kp.StreamingLLMPress(compression_ratio=ratio),
    "pyramidkv": lambda kp, ratio: kp.PyramidKVPress(compression_ratio=ratio),
    "criticalkv": lambda kp, ratio: kp.CriticalKVPress(_snapkv(kp, ratio)),
    "kvzip": lambda kp, ratio: kp.KVzipPress(compression_ratio=ratio),
}
# Presses that make their own forward passes after the prefill (KVzip's context reconstruction): replaying
# the prefill's hooks cannot run them, so their rows go through kvpress's pipeline itself, one prefill each.
OWN_PIPELINE = frozenset({"kvzip"})


def compression_ratio(budget, n_context: int) -> float:
    """kvpress's compression_ratio (share removed) for a kvx Budget over an n_context-token context."""
    if n_context <= 0:
        raise KvxError("cannot convert a budget for an empty context")
    if budget.fraction is not None:
        kept = budget.fraction
    else:
        kept = min(1.0, budget.tokens / n_context)
    return max(0.0, min(1.0, 1.0 - kept))


def _quiet_transformers() -> None:
    """transformers' weight-loading bars and warnings would bury kvx's progress bar on stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def require_kvpress():
    """Import kvpress (and transformers); a KvxError that says how to get them when either is missing."""
    hint = "--against kvpress needs the kvpress and transformers packages: pip install 'kvx[kvpress]'"
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise KvxError(hint + " (transformers is not installed)") from None
    try:
        import kvpress
    except ImportError:
        raise KvxError(hint + " (kvpress is not installed)") from None
    except Exception as exc:  # kvpress pins transformers versions; an incompatible pair fails at import
        raise KvxError(f"kvpress failed to import ({type(exc).__name__}: {exc}); "
                       "check that its transformers version requirement is met") from None
    return kvpress


@dataclass
class BaselineAnswer:
    prediction: str
    kv_bytes_held: int
    kv_bytes_full: int
    generated_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


class KvpressBaseline:
    """kvpress on a transformers model loaded from the same folder, dtype and device as kvx's."""

    name = "kvpress"

    def __init__(self, model_dir: str | Path, device: str, dtype, presses: list[str] | None = None):
        self.kvpress = require_kvpress()
        unknown = [p for p in presses or [] if p not in PRESSES]
        if unknown:
            raise KvxError(f"no kvpress press for {', '.join(unknown)}; known: {', '.join(PRESSES)}")
        self.presses = list(presses) if presses else list(PRESSES)
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

        try:
            _quiet_transformers()
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa")
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as exc:
            raise KvxError(f"transformers cannot load {model_dir} for kvpress: {exc}") from None
        model = model.to(device).eval()
        self.model = model
        self.pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=model.device)
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._entry_bytes = 2 * head_dim * next(model.parameters()).element_size()
        self._heads = cfg.num_hidden_layers * cfg.num_key_value_heads

    def pairs(self, budgets: list[str]) -> list[tuple[str, str]]:
        """(policy name, budget label) rows this baseline adds: its full cache, then every press x budget."""
        from kvx.policies import parse_budget

        labels = [str(parse_budget(b)) for b in budgets]
        return [(PREFIX + "full", FULL_BUDGET)] + [(PREFIX + p, b) for p in self.presses for b in labels]

    def make_press(self, policy_name: str, budget_label: str, n_context: int):
        """The kvpress press for a row (None for the full cache)."""
        from kvx.policies import parse_budget

        name = policy_name.removeprefix(PREFIX)
        if name == "full":
            return None
        return PRESSES[name](self.kvpress, compression_ratio(parse_budget(budget_label), n_context))

    def prefill(self, prompt, aware: bool = False) -> "KvpressPrefill":
        """Run the sample's context once; the returned object answers every press x budget from it.

        aware: the question is part of what is prefilled and compressed (kvpress's "query-aware" setting:
        the question goes at the end of the context, the pipeline's question is empty), so the prompt's
        tokens are the same and only the end of the user turn, the assistant header and the answer prefix
        come after the compression; kvx's aware mode also compresses those few tokens.
        """
        return KvpressPrefill(self, prompt, aware)

    def answer(self, prompt, policy_name: str, budget_label: str, n_context: int, max_tokens: int) -> BaselineAnswer:
        import torch
        from transformers import DynamicCache

        press = self.make_press(policy_name, budget_label, n_context)
        cache = DynamicCache()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.pipe(prompt.context, question=prompt.question, answer_prefix=prompt.answer_prefix,
                            press=press, max_new_tokens=max_tokens, cache=cache)
        elapsed = time.perf_counter() - t0
        prediction = out["answer"]
        # The pipeline trims each answer off the cache again: what is left is the compressed context.
        held = _cache_bytes(cache)
        generated = len(self.pipe.tokenizer.encode(prediction, add_special_tokens=False))
        return BaselineAnswer(prediction=prediction, kv_bytes_held=held,
                              kv_bytes_full=self._heads * n_context * self._entry_bytes,
                              generated_tokens=generated, timings={"wall_s": elapsed})


class KvpressPrefill:
    """One sample's context prefilled once, with every attention layer's hook arguments recorded."""

    def __init__(self, baseline: KvpressBaseline, prompt, aware: bool = False):
        import torch
        from transformers import DynamicCache

        self.baseline = baseline
        pipe, model = baseline.pipe, baseline.model
        context, question = (prompt.context + prompt.question, "") if aware else (prompt.context, prompt.question)
        self.pipeline_prompt = type(prompt)(context=context, question=question, answer_prefix=prompt.answer_prefix)
        tensors = pipe.preprocess(context, questions=[question], answer_prefix=prompt.answer_prefix,
                                  max_context_length=int(1e10))
        self.context_ids = tensors["context_ids"].to(model.device)
        self.question_ids = tensors["questions_ids"][0].to(model.device)
        self.n_context = self.context_ids.shape[1]
        self.records: list[tuple] = []  # (attention module, hook kwargs, hook output), in layer order

        def record(module, args, kwargs, output):
            self.records.append((module, dict(kwargs), output))

        layers = model.model.layers
        hooks = [layer.self_attn.register_forward_hook(record, with_kwargs=True) for layer in layers]
        self.cache = DynamicCache()
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                model.model(input_ids=self.context_ids, past_key_values=self.cache)
        finally:
            for hook in hooks:
                hook.remove()
        self.prefill_s = time.perf_counter() - t0

    def compress(self, policy_name: str, budget_label: str):
        """A copy of the full cache, compressed by the row's press exactly as the pipeline's prefill would."""
        import torch

        baseline = self.baseline
        press = baseline.make_press(policy_name, budget_label, self.n_context)
        cache = copy.deepcopy(self.cache)
        with torch.inference_mode():
            for module, _, _ in self.records:
                module.masked_key_indices = None  # the pipeline's next prefill would clear a head-wise mask too
            if press is not None:
                with press(baseline.model):
                    for module, kwargs, output in self.records:
                        press.forward_hook(module, [], {**kwargs, "past_key_values": cache}, output)
        return cache

    def answer(self, policy_name: str, budget_label: str, max_tokens: int) -> BaselineAnswer:
        """Replay the press on a copy of the full cache, then decode the question greedily."""
        import torch

        baseline = self.baseline
        if policy_name.removeprefix(PREFIX) in OWN_PIPELINE:
            # n_context for the budget: the context tokens the pipeline compresses, as for every other row.
            return baseline.answer(self.pipeline_prompt, policy_name, budget_label, self.n_context, max_tokens)
        t0 = time.perf_counter()
        cache = self.compress(policy_name, budget_label)
        compress_s = time.perf_counter() - t0
        held = _cache_bytes(cache)
        with torch.inference_mode():
            prediction = baseline.pipe.generate_answer(question_ids=self.question_ids, cache=cache,
                                                       context_length=self.n_context, max_new_tokens=max_tokens)
        generated = len(baseline.pipe.tokenizer.encode(prediction, add_special_tokens=False))
        return BaselineAnswer(prediction=prediction, kv_bytes_held=held,
                              kv_bytes_full=baseline._heads * self.n_context * baseline._entry_bytes,
                              generated_tokens=generated,
                              timings={"prefill_s": self.prefill_s, "compress_s": compress_s,
                                       "wall_s": time.perf_counter() - t0})


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)

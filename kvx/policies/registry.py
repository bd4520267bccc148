"""The named policies: which scorer, which default allocator, and what each one is."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from kvx.errors import KvxError
from kvx.policies.adakv import AdaAllocator
from kvx.policies.ahakv import AhaKVScorer
from kvx.policies.allocation import UniformAllocator
from kvx.policies.criticalkv import CriticalKVScorer
from kvx.policies.expected_attention import ExpectedAttentionScorer
from kvx.policies.global_topk import GlobalAllocator
from kvx.policies.h2o import H2OScorer
from kvx.policies.knorm import KNormScorer
from kvx.policies.kvzip import KVzipScorer
from kvx.policies.laprox import LaProxScorer
from kvx.policies.options import describe_options, parse_option
from kvx.policies.policy import Policy, SelectionOptions
from kvx.policies.pyramidkv import PyramidAllocator
from kvx.policies.random_scores import RandomScorer
from kvx.policies.snapkv import SnapKVScorer
from kvx.policies.streaming import StreamingScorer
from kvx.policies.tova import TOVAScorer

SCORERS = {
    "random": RandomScorer,
    "streaming": StreamingScorer,
    "h2o": H2OScorer,
    "snapkv": SnapKVScorer,
    "tova": TOVAScorer,
    "knorm": KNormScorer,
    "expected-attention": ExpectedAttentionScorer,
    "criticalkv": CriticalKVScorer,
    "ahakv": AhaKVScorer,
    "laprox": LaProxScorer,
    "kvzip": KVzipScorer,
}
ALLOCATORS = {
    "uniform": UniformAllocator,
    "pyramid": PyramidAllocator,
    "ada": AdaAllocator,
    "global": GlobalAllocator,
}
SCORER_NAMES = list(SCORERS)
ALLOCATOR_NAMES = list(ALLOCATORS)

# Option names accepted as another name for a field (the paper's own word).
_ALIASES = {"ahakv": {"recent": "window"}}


@dataclass(frozen=True)
class PolicyInfo:
    name: str
    one_line: str
    paper: str  # arXiv id and title
    stats: str  # what the attention must emit
    phases: tuple[str, ...]  # "prefill" (one-shot selection), "decode" (eviction while generating)
    allocation: str = "uniform"  # default allocator
    options: tuple[tuple[str, str, str], ...] = ()  # (name, default, help) of the scorer and its allocator


@dataclass(frozen=True)
class _Entry:
    scorer: str | None
    allocation: str
    one_line: str
    paper: str
    stats: str
    phases: tuple[str, ...]
    allocator_args: dict = field(default_factory=dict)
    # The scorer's and the selection's defaults where this policy's paper differs from the shared scorer's.
    scorer_args: dict = field(default_factory=dict)
    selection_args: dict = field(default_factory=dict)


_PREFILL = ("prefill",)
_BOTH = ("prefill", "decode")
_WINDOW = "attention of the last `window` prompt queries (col_sum)"

_ENTRIES: dict[str, _Entry] = {
    "full": _Entry(None, "uniform", "keep every entry (no compression)", "-", "none", _PREFILL),
    "streaming": _Entry("streaming", "uniform", "attention sinks plus the most recent tokens",
                        "2309.17453 StreamingLLM: Efficient Streaming Language Models with Attention Sinks",
                        "none (positions only)", _BOTH),
    "h2o": _Entry("h2o", "uniform", "heavy hitters by accumulated attention plus recent tokens (50/50)",
                  "2306.14048 H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs",
                  "attention mass from every prompt query (colsum_all); decode: each step's attention", _BOTH),
    "snapkv": _Entry("snapkv", "uniform", "window queries' attention, max-pooled, top per head",
                     "2404.14469 SnapKV: LLM Knows What You are Looking for Before Generation", _WINDOW, _PREFILL),
    "pyramidkv": _Entry("snapkv", "pyramid", "SnapKV scores with per-layer budgets decreasing with depth",
                        "2406.02069 PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
                        _WINDOW, _PREFILL),
    # Ada-KV's code takes the group mean of the window-mean attention, then max-pools (pool_order=group).
    "ada-snapkv": _Entry("snapkv", "ada", "SnapKV scores with head-wise budgets (top-B over a layer's heads)",
                         "2407.11550 Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation",
                         _WINDOW, _PREFILL, scorer_args={"pool_order": "group"}),
    "ada-pyramidkv": _Entry("snapkv", "ada", "Ada-KV head-wise budgets within PyramidKV's layer budgets",
                            "2407.11550 Ada-KV (with 2406.02069 PyramidKV's layer schedule)", _WINDOW, _PREFILL,
                            {"schedule": "pyramid"}, scorer_args={"pool_order": "group"}),
    # The paper (and kvpress) rank by the mean over every head of the layer: heads=layer by default.
    "tova": _Entry("tova", "uniform", "keep what the current query attends to most (mean over the layer's heads)",
                   "2401.06104 TOVA: Transformers are Multi-State RNNs",
                   "the last query's attention row; decode: each step's attention", _BOTH,
                   selection_args={"heads": "layer"}),
    "knorm": _Entry("knorm", "uniform", "keep the keys with the lowest L2 norm",
                    "2406.11430 A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
                    "key norms", _PREFILL),
    "expected-attention": _Entry("expected-attention", "uniform",
                                 "attention expected from future queries (Gaussian, RoPE-averaged) times ||v||",
                                 "2510.00636 Expected Attention: KV Cache Compression by Estimating Attention "
                                 "from Future Queries Distribution",
                                 "pre-RoPE query mean and covariance, post-RoPE keys, value norms", _PREFILL),
    "criticalkv": _Entry("criticalkv", "uniform",
                         "SnapKV for half of each head, the rest by attention x ||v W_O||_1",
                         "2502.03805 Identify Critical KV Cache in LLM Inference from an Output Perturbation "
                         "Perspective", _WINDOW + " and ||v W_O^h||_1", _PREFILL),
    "ahakv": _Entry("ahakv", "uniform",
                    "recent queries' sharpened (step-gain) attention times a value-norm prior",
                    "2506.03762 AhaKV: Adaptive Holistic Attention-Driven KV Cache Eviction",
                    "step-gain softmax column sums over the last r queries, value norms; decode: last r queries",
                    _BOTH),
    "laprox": _Entry("laprox", "global",
                     "output-product approximation score ||A[W,j]||_2 ||v W_O^h||_2, one top-K over the model",
                     "2605.07234 LaProx: layer-output approximation for model-wide KV cache eviction",
                     _WINDOW + ", its squares (col_sq) and ||v W_O^h||_2", _PREFILL),
    "kvzip": _Entry("kvzip", "global",
                    "max attention a context reconstruction pass gives each entry, one top-K over the model",
                    "2505.23416 KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
                    "column max of the reconstruction queries' attention (an extra pass after the prefill, "
                    "about two prefills)", _PREFILL, {"normalize": False}),
    "random": _Entry("random", "uniform", "random tokens (a control)", "-", "none", _PREFILL),
}
POLICY_NAMES = list(_ENTRIES)


def build_policy(name: str, allocation: str | None = None, args: dict[str, str] | None = None) -> Policy:
    """The policy `name`, optionally with another allocator and options overriding the defaults."""
    key = str(name).strip().lower()
    if key not in _ENTRIES:
        raise KvxError(f"unknown policy {name!r}; choose one of: {', '.join(POLICY_NAMES)}")
    entry = _ENTRIES[key]
    args = {str(k).strip().lower(): str(v) for k, v in (args or {}).items()}
    alloc_name = entry.allocation if allocation is None else str(allocation).strip().lower()
    if alloc_name not in ALLOCATORS:
        raise KvxError(f"unknown allocation {allocation!r}; choose one of: {', '.join(ALLOCATOR_NAMES)}")
    if entry.scorer is None:
        if args:
            raise KvxError(f"policy full keeps everything and takes no options (got {', '.join(args)})")
        return Policy("full", None, UniformAllocator())

    scorer_cls, alloc_cls = SCORERS[entry.scorer], ALLOCATORS[alloc_name]
    scorer_fields = {f.name: f for f in fields(scorer_cls)}
    alloc_fields = {f.name: f for f in fields(alloc_cls)}
    selection_fields = {f.name: f for f in fields(SelectionOptions)}
    selection_kw: dict = {}
    scorer_kw: dict = {}
    alloc_kw: dict = dict(entry.allocator_args) if alloc_name == entry.allocation else {}
    aliases = _ALIASES.get(key, {})
    for raw_key, text in args.items():
        opt = aliases.get(raw_key, raw_key)
        if opt in scorer_fields:
            if opt in scorer_kw:
                raise KvxError(f"option {opt} of policy {key} is given twice")
            scorer_kw[opt] = parse_option(f"policy {key}", scorer_fields[opt], text)
        elif opt in alloc_fields:
            alloc_kw[opt] = parse_option(f"allocation {alloc_name}", alloc_fields[opt], text)
        elif opt in selection_fields:
            selection_kw[opt] = parse_option(f"policy {key}", selection_fields[opt], text)
        else:
            valid = sorted(set(scorer_fields) | set(alloc_fields) | set(selection_fields) | set(aliases))
            owners = [a for a, cls in ALLOCATORS.items() if opt in {f.name for f in fields(cls)}]
            hint = f" ({opt} belongs to allocation {' / '.join(owners)})" if owners else ""
            raise KvxError(f"unknown option {raw_key!r} for policy {key} with allocation {alloc_name}{hint}; "
                           f"valid options: {', '.join(valid) if valid else 'none'}")
    scorer = scorer_cls(**{**entry.scorer_args, **scorer_kw})
    if hasattr(scorer, "mark_explicit"):
        scorer.mark_explicit(set(scorer_kw))
    return Policy(key, scorer, alloc_cls(**alloc_kw), SelectionOptions(**{**entry.selection_args, **selection_kw}))


def _shown(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def describe_policies() -> list[PolicyInfo]:
    out = []
    for name, e in _ENTRIES.items():
        options: tuple = ()
        if e.scorer is not None:
            def own(cls, overrides):
                return tuple((o, _shown(overrides[o]) if o in overrides else d, h)
                             for o, d, h in describe_options(cls))

            options = (own(SCORERS[e.scorer], e.scorer_args) + own(ALLOCATORS[e.allocation], e.allocator_args)
                       + own(SelectionOptions, e.selection_args))
        out.append(PolicyInfo(name=name, one_line=e.one_line, paper=e.paper, stats=e.stats, phases=e.phases,
                              allocation=e.allocation, options=options))
    return out


def split_policy_list(text: str) -> list[str]:
    """Comma-separated policy specs, where a spec may carry options in brackets: "snapkv,tova[heads=layer]"."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise KvxError(f"unbalanced ']' in policy list {text!r}")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise KvxError(f"unclosed '[' in policy list {text!r}")
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def parse_policy_spec(spec: str) -> tuple[str, dict[str, str]]:
    """"ahakv[score_kernel=15,window=64]" -> ("ahakv", {"score_kernel": "15", "window": "64"})."""
    text = spec.strip()
    if "[" not in text:
        return text.lower(), {}
    if not text.endswith("]"):
        raise KvxError(f"policy {spec!r}: options go in brackets at the end, e.g. tova[heads=layer]")
    name, inner = text[:-1].split("[", 1)
    args: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in inner.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise KvxError(f"policy {spec!r}: expected key=value options, got {item!r}")
        args[key.strip().lower()] = value.strip()
    return name.strip().lower(), args


def policy_label(name: str, args: dict[str, str]) -> str:
    """How results name a policy spec: the name, and its options in brackets when there are any."""
    return name if not args else f"{name}[{','.join(f'{k}={v}' for k, v in args.items())}]"

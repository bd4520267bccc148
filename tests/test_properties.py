"""Property tests: the parsers of user input give a result or a one-line KvxError, never an exception.

Covered: the budget parser, the policy-option parsers (`--policy/--budget/--allocation/--policy-arg`,
eval's `--policies` list), memory sizes, sampling values, the JSONL request reader of `kvx generate
--jsonl` (fed arbitrary bytes, with a stand-in engine) and the eval results reader.
"""

from __future__ import annotations

import functools
import io
import json
import math
from contextlib import ExitStack
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvx.errors import KvxError
from kvx.policies import POLICY_NAMES, Budget, parse_budget
from kvx.policies.registry import ALLOCATOR_NAMES, build_policy, parse_policy_spec, split_policy_list

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def one_line(exc: KvxError) -> str:
    text = str(exc)
    assert text and "\n" not in text and "\r" not in text
    return text


def outcome(fn, *args, **kwargs):
    """fn's result, or the KvxError it raised (checked to be one line); any other exception fails."""
    try:
        return fn(*args, **kwargs)
    except KvxError as exc:
        one_line(exc)
        return exc


numbers = st.one_of(st.integers(-10**6, 10**20).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.decimals(allow_nan=False, allow_infinity=False, places=3).map(str))
budget_texts = st.one_of(
    st.text(max_size=12),
    numbers,
    st.tuples(numbers, st.sampled_from(["%", " %", "%%", "", " "])).map("".join),
    st.tuples(st.sampled_from(["", " ", "+", "-", "\t"]), numbers, st.sampled_from(["%", ""])).map("".join),
)


@SETTINGS
@given(budget_texts)
def test_budget_parser(text):
    budget = outcome(parse_budget, text)
    if isinstance(budget, KvxError):
        return
    assert isinstance(budget, Budget) and (budget.fraction is None) != (budget.tokens is None)
    if budget.fraction is not None:
        assert 0 < budget.fraction <= 1
        again = parse_budget(str(budget))  # what the summary prints reads back as (about) the same budget
        assert math.isclose(again.fraction, budget.fraction, rel_tol=1e-5)
    else:
        assert budget.tokens >= 1 and parse_budget(str(budget)) == budget


@SETTINGS
@given(budget_texts, st.integers(0, 10**6), st.integers(1, 64), st.integers(1, 16))
def test_a_parsed_budget_keeps_what_exists(text, n, layers, heads):
    budget = outcome(parse_budget, text)
    if isinstance(budget, KvxError):
        return
    per_head, total = budget.per_head(n), budget.total_entries(n, layers, heads)
    assert (per_head == 0) if n == 0 else (1 <= per_head <= n)
    assert min(layers * heads, layers * heads * n) <= total <= layers * heads * n or n == 0


keys = st.sampled_from(["window", "kernel", "sinks", "heads", "score_kernel", "schedule", "alpha", "r", "seed",
                        "nope", "", "WINDOW", " window "])
values = st.one_of(st.text(max_size=6), numbers, st.sampled_from(["true", "no", "layer", "auto", "none", "-1", "0"]))
policy_args = st.lists(st.one_of(st.tuples(keys, st.sampled_from(["=", "", "=="]), values).map("".join),
                                 st.text(max_size=10)), max_size=3)
policy_names = st.one_of(st.sampled_from(POLICY_NAMES), st.sampled_from([n.upper() for n in POLICY_NAMES]),
                         st.text(max_size=8))


@SETTINGS
@given(st.one_of(st.none(), policy_names), st.one_of(st.none(), budget_texts),
       st.one_of(st.none(), st.sampled_from(ALLOCATOR_NAMES), st.text(max_size=6)), policy_args,
       st.one_of(st.none(), st.integers(-5, 5000)))
def test_policy_options_parser(policy, budget, allocation, args, chunk):
    from kvx.options import policy_and_budget

    result = outcome(policy_and_budget, policy, budget, allocation, args, chunk)
    if isinstance(result, KvxError):
        return
    pol, bud = result
    assert (pol is None) == (bud is None)  # a budget is never dropped, a policy never runs without one
    if pol is None:
        assert (policy or "full").strip().lower() == "full" and budget is None and not allocation
    else:
        assert pol.name in POLICY_NAMES and pol.name != "full" and isinstance(bud, Budget)


specs = st.one_of(
    st.text(max_size=20),
    st.tuples(policy_names, st.sampled_from(["", "[", "[]", "]"]),
              st.lists(st.tuples(keys, st.just("="), values).map("".join), max_size=2).map(",".join),
              st.sampled_from(["]", "", "]]", ",snapkv"])).map("".join),
)


@SETTINGS
@given(st.lists(specs, max_size=3).map(",".join))
def test_eval_policy_list_parser(text):
    parts = outcome(split_policy_list, text)
    if isinstance(parts, KvxError):
        return
    assert all(p and p == p.strip() for p in parts)
    for spec in parts:
        parsed = outcome(parse_policy_spec, spec)
        if not isinstance(parsed, KvxError):
            outcome(build_policy, parsed[0], args=parsed[1])


@SETTINGS
@given(st.one_of(st.text(max_size=12), st.tuples(numbers, st.sampled_from(["", "GiB", "gb", " MiB", "k", "TB", "x"]))
                 .map("".join)))
def test_memory_size_parser(text):
    from kvx.runtime.memory import parse_size

    size = outcome(parse_size, text)
    assert isinstance(size, KvxError) or (isinstance(size, int) and size >= 1)


@SETTINGS
@given(st.floats(allow_nan=True), st.floats(allow_nan=True), st.integers(-3, 10**21), st.integers(-3, 2**65))
def test_sampling_values(temperature, top_p, top_k, seed):
    from kvx.options import check_sampling
    from kvx.runtime.engine.sampling import SamplingParams, make_generator

    params = outcome(check_sampling, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed))
    if not isinstance(params, KvxError):
        make_generator(params, "cpu")  # every accepted seed seeds a generator


# -- the JSONL request reader of `kvx generate --jsonl` --------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
request_fields = ["id", "prompt", "context", "question", "questions", "max_tokens", "temperature", "top_p",
                  "top_k", "seed", "raw", "system"]
requests = st.dictionaries(st.sampled_from(request_fields),
                           st.one_of(json_values, st.text(max_size=12), st.lists(st.text(max_size=6), max_size=3)),
                           max_size=5)
lines = st.one_of(requests.map(json.dumps), json_values.map(json.dumps), st.text(max_size=20).map(str.strip))
inputs = st.lists(st.one_of(lines.map(str.encode), st.binary(max_size=20).map(lambda b: b.replace(b"\n", b""))),
                  max_size=5).map(lambda ls: b"".join(line + b"\n" for line in ls))


class _Tokenizer:
    """Bytes as ids, like a byte-level tokenizer (and, like a real one, refusing lone surrogates)."""

    has_chat_template = False
    eos_token_ids: list[int] = []

    def encode(self, text, add_special_tokens=True):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


@functools.cache
def _tiny_engine():
    """A real engine on a tiny random checkpoint (256 ids, a 64-token context): the batched engine the
    reader feeds runs for real, cheaply."""
    import tempfile

    import torch

    from checkpoints import make_checkpoint
    from kvx.models.transformer import Transformer
    from kvx.runtime.engine.model_runner import ModelRunner

    torch.set_num_threads(1)
    path, _ = make_checkpoint("qwen2", tempfile.mkdtemp(), vocab_size=256, max_position_embeddings=64)
    return ModelRunner(Transformer.from_pretrained(path), _Tokenizer())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs)
@example(b'{"id": 1, "prompt": "hi"}\n{"context": "c", "questions": ["q?", "r?"], "max_tokens": 2}\n\n{"prompt": ""}\n')
@example(b'{"prompt": "\\ud800"}\n{"prompt": "x", "temperature": 1e400}\n{"context": "c", "questions": "abc"}\n')
def test_jsonl_reader(data):
    from kvx.inputs import utf8_lines
    from kvx.pipeline import run_jsonl
    from kvx.runtime.engine.sampling import SamplingParams

    out = io.StringIO()
    with ExitStack() as stack:
        stack.enter_context(mock.patch("kvx.options.load", lambda *a, **k: (None, _Tokenizer())))
        stack.enter_context(mock.patch("kvx.options.build_engine", lambda *a, **k: _tiny_engine()))
        # As `kvx generate --jsonl` reads stdin: a line that is not UTF-8 is that line's error only.
        failures = outcome(run_jsonl, utf8_lines(io.BytesIO(data), per_line=True), out, model=None, device="cpu",
                           dtype="auto", policy="full", budget=None, allocation=None, policy_args=[],
                           params=SamplingParams(), max_tokens=3, raw=False, system=None, quiet=True,
                           kv_memory=4 << 20)
    written = [json.loads(line) for line in out.getvalue().splitlines()]
    for row in written:
        assert isinstance(row["line"], int)
        assert ("error" in row and "\n" not in row["error"]) or "text" in row or "results" in row
    assert not isinstance(failures, KvxError)
    assert failures == sum("error" in row for row in written)
    assert len(written) == sum(1 for raw in io.BytesIO(data) if _answered(raw))  # blank lines skipped


def _answered(raw: bytes) -> bool:
    """Whether the reader answers this input line: every line but a blank (decodable) one."""
    from kvx.inputs import decode_utf8

    try:
        return bool(decode_utf8(raw, "line").strip())
    except KvxError:
        return True


def test_jsonl_reader_refuses_deep_nesting():
    from kvx.inputs import MAX_JSON_DEPTH, utf8_lines

    deep = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"\n"
    ok = b'{"prompt": "' + b"[" * (MAX_JSON_DEPTH + 1) + b'"}\n'  # brackets inside a string are text
    assert list(utf8_lines(io.BytesIO(ok))) == [ok.decode()]
    with pytest.raises(KvxError, match="line 2 nests deeper"):
        list(utf8_lines(io.BytesIO(ok + deep)))


# -- the eval results reader ----------------------------------------------------------------------------

row_fields = ["task", "context", "haystack", "seed", "depth", "mode", "policy", "budget", "score"]
rows = st.dictionaries(st.sampled_from(row_fields), st.one_of(json_values, st.text(max_size=6)), max_size=9)
results_files = st.lists(st.one_of(rows.map(json.dumps), json_values.map(json.dumps), st.text(max_size=12)),
                         max_size=4).map("\n".join).map(str.encode) | st.binary(max_size=40)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(results_files)
def test_results_reader(tmp_path, data):
    from kvx.eval.results import ResultsFile, row_key

    path = tmp_path / "r.jsonl"
    path.write_bytes(data)
    results = outcome(ResultsFile, path)
    if not isinstance(results, KvxError):
        assert all(row_key(r) in results for r in results.rows)
    assert path.read_bytes() == data  # reading never rewrites

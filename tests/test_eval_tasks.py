"""The synthetic eval tasks: determinism, length fitting, needle depth, answers, scoring, errors."""

from __future__ import annotations

import itertools
import os
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from kvx.errors import KvxError
from kvx.eval import tasks
from kvx.eval.haystack import NOISE_SENTENCES, haystack_sentences, prose_topics
from kvx.eval.scoring import score_all, score_part, score_sample
from kvx.eval.tasks import TASKS, Sample, depth_sweep, generate
from kvx.eval.words import common_words_vocabulary

NEEDLE_TASKS = [t for t in TASKS if t not in ("common_words", "frequent_words")]
HAYSTACKS = ["noise", "prose"]


def _default_tokenizer_json() -> Path:
    # Mirrors kvx.models.hub.cache_dir() without importing it (that import pulls in torch: seconds).
    if os.environ.get("KVX_HOME"):
        root = Path(os.environ["KVX_HOME"]).expanduser()
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "kvx"
    else:
        root = Path.home() / ".cache" / "kvx"
    return root / "models" / "SmolLM2-135M-Instruct" / "tokenizer.json"


class WhitespaceTokenizer:
    """A stand-in tokenizer: one token per whitespace-separated word."""

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]


class ListTokenizer:
    """The default model's BPE tokenizer, returning a plain list of ids as kvx's tokenizer does."""

    def __init__(self, inner):
        self.inner = inner

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def stub_tokenizer() -> WhitespaceTokenizer:
    return WhitespaceTokenizer()


@pytest.fixture(scope="module")
def tokenizer(stub_tokenizer):
    """The default model's real tokenizer when it has been pulled, else the whitespace stub."""
    path = _default_tokenizer_json()
    if not path.is_file():
        return stub_tokenizer
    from tokenizers import Tokenizer

    return ListTokenizer(Tokenizer.from_file(str(path)))


def _count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text))


def _body(sample: Sample) -> str:
    instruction, body = sample.context.split("\n", 1)
    assert instruction and "\n" not in body
    return body


# --- determinism -------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_same_arguments_give_the_same_sample(task, haystack, tokenizer):
    first = generate(task, tokenizer, 1500, seed=11, depth=0.4, haystack=haystack)
    again = generate(task, tokenizer, 1500, seed=11, depth=0.4, haystack=haystack)
    assert first == again
    assert first.task == task and first.seed == 11 and first.haystack == haystack


@pytest.mark.parametrize("task", list(TASKS))
def test_different_seeds_give_different_needles(task, tokenizer):
    answers = {tuple(generate(task, tokenizer, 1200, seed=s).answers) for s in range(4)}
    assert len(answers) == 4
    contexts = {generate(task, tokenizer, 1200, seed=s, depth=0.5).context for s in range(2)}
    assert len(contexts) == 2


def test_needles_do_not_depend_on_length_or_depth(tokenizer):
    for task in NEEDLE_TASKS:
        short = generate(task, tokenizer, 700, seed=5, depth=0.1)
        long = generate(task, tokenizer, 1600, seed=5, depth=0.9, haystack="prose")
        assert short.answers == long.answers and short.question == long.question


def test_random_depth_is_seeded_and_recorded(tokenizer):
    depths = [generate("passkey", tokenizer, 800, seed=s).depth for s in range(5)]
    assert all(0.0 <= d <= 1.0 for d in depths) and len(set(depths)) == 5
    assert generate("passkey", tokenizer, 800, seed=3).depth == depths[3]
    assert generate("common_words", tokenizer, 800, seed=3, depth=0.5).depth is None


# --- length ------------------------------------------------------------------------------------------


def _largest_unit_tokens(tokenizer, haystack: str) -> int:
    sentences = NOISE_SENTENCES if haystack == "noise" else [s for v in prose_topics().values() for s in v]
    return max(_count(tokenizer, " " + s) for s in sentences)


@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("length", [900, 3000])
def test_context_fills_the_length_to_within_one_sentence(haystack, length, tokenizer):
    # +2: a BPE merge across the join can shift a count by a token either way.
    slack = _largest_unit_tokens(tokenizer, haystack) + 2
    for task in NEEDLE_TASKS:
        sample = generate(task, tokenizer, length, seed=2, depth=0.5, haystack=haystack)
        assert sample.n_tokens == _count(tokenizer, sample.context)
        assert length - slack < sample.n_tokens <= length, (task, sample.n_tokens)


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [700, 4500])
def test_one_more_unit_would_exceed_the_length(task, length, tokenizer):
    # The exact promise, checked on the generator's own layout: n units fit, n + 1 do not.
    layout = tasks._BUILDERS[task](tasks._Request.of(task, length, 4, 0.3, "prose"))

    def count(n: int) -> int:
        return _count(tokenizer, layout.context(n))

    n = tasks._fit(task, layout, count, length)
    assert count(n) <= length < count(n + 1)
    sample = generate(task, tokenizer, length, seed=4, depth=0.3, haystack="prose")
    assert sample.context == layout.context(n) and sample.n_tokens == count(n)


def test_aggregation_tasks_fit_closely(tokenizer):
    for task, length in [("common_words", 2000), ("common_words", 6000), ("frequent_words", 3000)]:
        sample = generate(task, tokenizer, length, seed=1)
        assert length - 60 < sample.n_tokens <= length


def test_stub_tokenizer_counts_words(stub_tokenizer):
    sample = generate("niah_single", stub_tokenizer, 1000, seed=0, depth=0.5)
    assert sample.n_tokens == len(sample.context.split())
    assert 1000 - 5 < sample.n_tokens <= 1000  # the longest noise sentence has 4 words


def test_tokenizers_encoding_objects_are_accepted():
    path = _default_tokenizer_json()
    if not path.is_file():
        pytest.skip("the default model's tokenizer has not been pulled")
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(path))  # .encode returns an Encoding, its ids in .ids
    sample = generate("passkey", raw, 1000, seed=0)
    assert sample.n_tokens == len(raw.encode(sample.context).ids) <= 1000


def test_largest_fitting_brackets_the_target():
    rng = random.Random(0)
    for _ in range(200):
        per_unit, fixed = rng.randint(1, 9), rng.randint(0, 50)
        target = fixed + rng.randint(0, 5000)
        guess = rng.randint(0, 3000)
        calls = []

        def count(n: int) -> int:
            calls.append(n)
            return fixed + per_unit * n

        n = tasks._largest_fitting(count, target, 0, guess, 1 << 40)
        assert count(n) <= target < count(n + 1)
        assert len(calls) < 60
    assert tasks._largest_fitting(lambda n: n, 10**6, 0, 5, 40) == 40  # capped by `high`


# --- depth -------------------------------------------------------------------------------------------


def test_depth_sweep():
    assert depth_sweep(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert depth_sweep(2) == [0.0, 1.0]
    assert depth_sweep(1) == [0.5]
    with pytest.raises(KvxError):
        depth_sweep(0)


@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_needle_sits_at_the_requested_depth(haystack, tokenizer):
    for depth in depth_sweep(9):
        sample = generate("passkey", tokenizer, 2500, seed=7, depth=depth, haystack=haystack)
        key = sample.answers[0]
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        body = _body(sample)
        assert body.count(needle) == 1 and sample.depth == depth
        where = body.index(needle) / (len(body) - len(needle))
        assert abs(where - depth) < 0.05, (depth, where)
        if depth == 0.0:
            assert body.startswith(needle)
        if depth == 1.0:
            assert body.endswith(needle)
        # On a sentence boundary: the needle is whole, flanked by the haystack's full stops.
        before, after = body.split(needle)
        assert before == "" or before.endswith(". ")
        assert after == "" or (after.startswith(" ") and after[1].isupper())


def test_multikey_depth_applies_to_the_queried_needle(tokenizer):
    for depth in (0.0, 0.5, 1.0):
        sample = generate("niah_multikey", tokenizer, 3000, seed=8, depth=depth)
        body = _body(sample)
        needle = next(s for s in re.findall(r"One of the special magic numbers for [^.]*\.", body)
                      if sample.answers[0] in s)
        where = body.index(needle) / (len(body) - len(needle))
        assert abs(where - depth) < 0.05


def test_variable_chain_starts_at_depth_and_stays_in_order(tokenizer):
    for depth in (0.0, 0.3, 0.8):
        sample = generate("variable_tracking", tokenizer, 3000, seed=9, depth=depth, haystack="prose")
        body = _body(sample)
        first = body.index(f"VAR {sample.answers[0]} = ")
        assert abs(first / len(body) - depth) < 0.05
        positions = [body.index(f"VAR {name} = ") for name in sample.answers]
        assert positions == sorted(positions)


# --- answers can be read off the context ---------------------------------------------------------------


SEEDS = range(4)


def test_passkey_answer_is_in_the_context(tokenizer):
    for seed in SEEDS:
        sample = generate("passkey", tokenizer, 1000, seed=seed, haystack="prose")
        (key,) = sample.answers
        assert re.fullmatch(r"\d{5}", key)
        assert sample.context.count(key) == 2 and f"The pass key is {key}." in sample.context
        assert sample.question == "What is the pass key?" and sample.answer_prefix == "The pass key is"


UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def _magic(context: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    needle = r"One of the special magic (?:numbers|uuids) for (\S+) is: (\S+)\."
    for key, value in re.findall(needle, context):
        found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_niah_answers_are_the_queried_keys_values(haystack, tokenizer):
    shapes = {  # task: (keys in the context, values per key, keys asked)
        "niah_single": (1, 1, 1), "niah_uuid": (1, 1, 1), "niah_multikey": (4, 1, 1),
        "niah_multivalue": (1, 4, 1), "niah_multiquery": (4, 1, 4),
    }
    for (task, (n_keys, n_values, n_asked)), seed in itertools.product(shapes.items(), SEEDS):
        sample = generate(task, tokenizer, 1000, seed=seed, haystack=haystack)
        magic = _magic(sample.context)
        assert len(magic) == n_keys and all(len(v) == n_values for v in magic.values())
        asked = [key for key in magic if key in sample.question]
        assert len(asked) == n_asked and all(key in sample.answer_prefix for key in asked)
        assert sorted(sample.answers) == sorted(v for key in asked for v in magic[key])
        pattern = UUID4 if task == "niah_uuid" else r"[1-9]\d{6}"
        assert all(re.fullmatch(pattern, a) for a in sample.answers)
        assert all(sample.context.count(a) == 1 for a in sample.answers)
        singular = len(sample.answers) == 1
        assert sample.question.startswith("What is" if singular else "What are all")
        assert sample.answer_prefix.endswith(" is" if singular else " are")


def test_variable_tracking_answers_follow_the_chain(tokenizer):
    for seed, haystack in itertools.product(SEEDS, HAYSTACKS):
        sample = generate("variable_tracking", tokenizer, 1200, seed=seed, haystack=haystack)
        assignments = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})", sample.context))
        value = re.search(r"assigned the value (\d{5})", sample.question).group(1)

        def resolve(name: str) -> str:
            target = assignments[name]
            return resolve(target[4:]) if target.startswith("VAR ") else target

        holders = {name for name in assignments if resolve(name) == value}
        assert holders == set(sample.answers) and len(sample.answers) == 5
        assert f"5 variables are assigned the value {value}" in sample.answer_prefix


@pytest.mark.parametrize("length", [1500, 5000])
def test_common_words_answers_are_the_most_common(length, tokenizer):
    for seed in range(3):
        sample = generate("common_words", tokenizer, length, seed=seed)
        entries = re.findall(r"(\d+)\. (\S+)", _body(sample))
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(word for _, word in entries)
        assert set(counts) <= set(common_words_vocabulary())
        assert len(sample.answers) == 10 and set(sample.answers) <= set(counts)
        rarest_answer = min(counts[w] for w in sample.answers)
        assert all(counts[w] < rarest_answer for w in counts if w not in sample.answers)
        assert rarest_answer == (6 if length < 4096 else 30)
        # Substring scoring is exact only if no listed word is part of another one.
        assert not any(a != b and a in b for a in sample.answers for b in counts)


def test_frequent_words_answers_are_the_most_frequent(tokenizer):
    for seed, length in itertools.product(range(3), (400, 3000)):
        sample = generate("frequent_words", tokenizer, length, seed=seed)
        counts = Counter(_body(sample).split())
        assert counts.most_common(1)[0][0] == "..."
        del counts["..."]
        ranked = counts.most_common()
        assert {w for w, _ in ranked[:3]} == set(sample.answers)
        assert ranked[2][1] > ranked[3][1]  # no tie with the fourth word
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in sample.answers)


# --- haystacks ---------------------------------------------------------------------------------------


def test_noise_haystack_cycles_its_sentences():
    first = list(itertools.islice(haystack_sentences("noise", 0), 12))
    assert first == list(NOISE_SENTENCES) * 2 + list(NOISE_SENTENCES[:2])


def test_prose_haystack_is_endless_seeded_prose():
    n_sentences = sum(len(v) for v in prose_topics().values())
    assert n_sentences > 500
    a = list(itertools.islice(haystack_sentences("prose", 1), 2 * n_sentences + 10))
    assert a == list(itertools.islice(haystack_sentences("prose", 1), 2 * n_sentences + 10))
    assert a[:50] != list(itertools.islice(haystack_sentences("prose", 2), 50))
    assert all(s[0].isupper() and s.endswith(".") and 5 <= len(s.split()) <= 50 for s in a)
    assert Counter(a[:n_sentences]) == Counter(a[n_sentences : 2 * n_sentences])  # each pass: every sentence


# --- scoring -----------------------------------------------------------------------------------------


def test_score_all_and_part():
    answers = ["4821907", "1234567", "Apple-Tree", "zzz"]
    assert score_all("4821907, 1234567, apple-tree and ZZZ", answers) == 1.0
    assert score_all("the numbers are 4821907 and 1234567", answers) == 0.5
    assert score_all("APPLE-TREE", answers) == 0.25
    assert score_all("nothing here: 482190", answers) == 0.0
    assert score_part("only apple-tree", answers) == 1.0
    assert score_part("4821907", answers) == 1.0
    assert score_part("none of them", answers) == 0.0
    assert score_all("", ["x"]) == 0.0
    with pytest.raises(KvxError):
        score_all("x", [])
    with pytest.raises(KvxError):
        score_part("x", [])


def test_score_sample_uses_string_match_all(tokenizer):
    sample = generate("niah_multivalue", tokenizer, 800, seed=3)
    a, b, c, d = sample.answers
    assert score_sample(sample, f"{a}, {b}, {c} and {d}.") == 1.0
    assert score_sample(sample, f"{a} and {c}") == 0.5
    assert score_sample(sample, "I do not know.") == 0.0
    words = generate("common_words", tokenizer, 800, seed=3)
    prediction = " ".join(f"{i}. {w.upper()}" for i, w in enumerate(words.answers[:7], start=1))
    assert score_sample(words, prediction) == pytest.approx(0.7)


# --- errors ------------------------------------------------------------------------------------------


def test_user_errors_are_kvx_errors(tokenizer, stub_tokenizer):
    with pytest.raises(KvxError, match="unknown task"):
        generate("niah_everything", tokenizer, 1000, seed=0)
    with pytest.raises(KvxError, match="unknown haystack"):
        generate("passkey", tokenizer, 1000, seed=0, haystack="essays")
    with pytest.raises(KvxError, match="unknown haystack"):
        generate("common_words", tokenizer, 1000, seed=0, haystack="essays")
    with pytest.raises(KvxError, match="unknown haystack"):
        haystack_sentences("essays", 0)
    with pytest.raises(KvxError, match="depth"):
        generate("passkey", tokenizer, 1000, seed=0, depth=1.5)
    with pytest.raises(KvxError, match="at least"):
        generate("niah_multiquery", tokenizer, 40, seed=0)
    with pytest.raises(KvxError):
        generate("passkey", tokenizer, 0, seed=0)
    with pytest.raises(KvxError, match="at most"):  # the word list runs out
        generate("common_words", stub_tokenizer, 100_000, seed=0)


def test_ruler_short_names_are_accepted(tokenizer):
    for short, full in [("cwe", "common_words"), ("fwe", "frequent_words"), ("vt", "variable_tracking")]:
        assert generate(short, tokenizer, 800, seed=1) == generate(full, tokenizer, 800, seed=1)

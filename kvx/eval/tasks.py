"""RULER-style synthetic long-context tasks, generated locally from a seed (nothing is downloaded).

`generate(task, tokenizer, context_tokens, seed, depth, haystack)` returns one `Sample`: a context (an
instruction line, then filler with the needles hidden in it), the question to ask after it, the prefix the
answer should start with, and the reference answers.

Length: the context holds as many whole filler units as fit, so it never exceeds the request:
`n_tokens <= context_tokens`, and one more unit would take it past `context_tokens`. A unit is a haystack
sentence (passkey, niah_*, variable_tracking), one uncommon word with all its repeats (common_words) or
one step of the word count (frequent_words). `context_tokens` counts the context alone, not the question,
the answer prefix or a chat template around them.

Depth (0..1) puts the task's first needle at that fraction of the haystack's characters, on the nearest
sentence boundary (0: right after the instruction, 1: at the very end); the other needles (distractors,
further values, the rest of a variable chain) fall at seeded random depths. With depth None the first
needle's depth is drawn from the seed too, and Sample.depth records it. The aggregation tasks
(common_words, frequent_words) hide no needle: they ignore depth and haystack, and record depth None.

Determinism: a Sample depends only on (task, seed, context_tokens, depth, haystack) and the tokenizer.
Needles depend on (task, seed) alone (frequent_words: also on context_tokens, which sets its vocabulary
size), so a length or depth sweep with one seed asks about the same needle every time.

Prompts follow RULER's wording (NVIDIA/RULER, arXiv 2404.06654). Unlike RULER, variable_tracking and
common_words carry no in-context example, and the haystack is joined with spaces throughout.
"""

from __future__ import annotations

import bisect
import random
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvx.errors import KvxError
from kvx.eval.haystack import HAYSTACKS, haystack_sentences
from kvx.eval.words import common_words_vocabulary, random_key

TASKS: dict[str, str] = {
    "passkey": "find a 5-digit pass key hidden in the haystack",
    "niah_single": "one key, one 7-digit value (RULER niah_single)",
    "niah_uuid": "one key, one UUID value (RULER niah_single_3)",
    "niah_multikey": "find one key's value among 4 keys (RULER niah_multikey_1)",
    "niah_multivalue": "find all 4 values of one key (RULER niah_multivalue)",
    "niah_multiquery": "find the values of 4 keys (RULER niah_multiquery)",
    "variable_tracking": "follow a 4-hop chain of variable assignments (RULER vt)",
    "common_words": "name the 10 most common words of a numbered list (RULER cwe)",
    "frequent_words": "name the 3 most frequent coded words (RULER fwe)",
}


# RULER's short names, accepted on input; a Sample always carries the full name.
_ALIASES = {"vt": "variable_tracking", "cwe": "common_words", "fwe": "frequent_words"}


@dataclass
class Sample:
    task: str
    context: str  # instruction line, then the haystack with the needles in it
    question: str
    answer_prefix: str  # the start of the answer, given to the model after the question
    answers: list[str]  # every one should appear in a correct prediction
    depth: float | None  # depth of the first needle; None for tasks without a needle
    n_tokens: int  # len(tokenizer.encode(context))
    seed: int
    haystack: str = "noise"


def generate(
    task: str,
    tokenizer,
    context_tokens: int,
    seed: int,
    depth: float | None = None,
    haystack: str = "noise",
) -> Sample:
    """One sample of `task` whose context is at most `context_tokens` long, short of it by under one unit.

    `tokenizer` is anything with `.encode(text)` returning token ids (a list, or an object with `.ids`).
    """
    task = _ALIASES.get(task, task)
    if task not in _BUILDERS:
        raise KvxError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    if haystack not in HAYSTACKS:
        raise KvxError(f"unknown haystack {haystack!r}; choose one of: {', '.join(HAYSTACKS)}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise KvxError(f"depth must lie between 0 and 1, got {depth}")
    if context_tokens <= 0:
        raise KvxError(f"context length must be a positive number of tokens, got {context_tokens}")
    layout = _BUILDERS[task](_Request.of(task, context_tokens, seed, depth, haystack))

    counts: dict[int, int] = {}

    def count(n: int) -> int:
        if n not in counts:
            counts[n] = _count_tokens(tokenizer, layout.context(n))
        return counts[n]

    n = _fit(task, layout, count, context_tokens)
    return Sample(
        task=task,
        context=layout.context(n),
        question=layout.question,
        answer_prefix=layout.answer_prefix,
        answers=list(layout.answers),
        depth=layout.depth,
        n_tokens=count(n),
        seed=seed,
        haystack=haystack,
    )


def depth_sweep(n: int) -> list[float]:
    """`n` depths spread evenly over 0..1, both ends included (one depth: the middle)."""
    if n < 1:
        raise KvxError(f"a depth sweep needs at least one depth, got {n}")
    if n == 1:
        return [0.5]
    return [i / (n - 1) for i in range(n)]


# --- what a task builder produces --------------------------------------------------------------------


@dataclass
class _Request:
    task: str
    seed: int
    context_tokens: int
    depth: float | None
    haystack: str
    rng: random.Random  # keys, values, word choices
    depth_rng: random.Random  # needle depths, kept apart so that giving a depth leaves the needles alone

    @classmethod
    def of(cls, task: str, context_tokens: int, seed: int, depth: float | None, haystack: str) -> _Request:
        return cls(
            task=task,
            seed=seed,
            context_tokens=context_tokens,
            depth=depth,
            haystack=haystack,
            rng=random.Random(f"kvx-task:{task}:{seed}"),
            depth_rng=random.Random(f"kvx-depth:{task}:{seed}"),
        )


@dataclass
class _Layout:
    """A sample with its amount of filler left open: `body(n)` is the text holding n filler units."""

    instruction: str
    question: str
    answer_prefix: str
    answers: list[str]
    depth: float | None
    body: Callable[[int], str]
    min_units: int = 0
    max_units: int | None = None  # None: the filler never runs out

    def context(self, n: int) -> str:
        return f"{self.instruction}\n{self.body(n)}"


def _count_tokens(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text)
    return len(getattr(ids, "ids", ids))  # a `tokenizers.Encoding` keeps its ids in .ids


# --- fitting the filler to a token count -------------------------------------------------------------

_PROBE_UNITS = 32
_NO_LIMIT = 1 << 40


def _fit(task: str, layout: _Layout, count: Callable[[int], int], target: int) -> int:
    """The number of filler units to use: a cheap per-unit estimate, then exact counts."""
    low = layout.min_units
    high = _NO_LIMIT if layout.max_units is None else layout.max_units
    floor_tokens = count(low)
    if floor_tokens > target:
        raise KvxError(f"task {task!r} needs a context of at least {floor_tokens} tokens, got {target}")
    probe = min(low + _PROBE_UNITS, high)
    per_unit = max((count(probe) - floor_tokens) / max(probe - low, 1), 0.25)
    guess = min(low + int((target - floor_tokens) / per_unit), high)
    if guess > low:  # one secant step, with the rate measured over the whole guess, saves counts later
        per_unit = max((count(guess) - floor_tokens) / (guess - low), 0.25)
        guess = low + int((target - floor_tokens) / per_unit)
    n = _largest_fitting(count, target, low, guess, high)
    if n == layout.max_units:
        raise KvxError(
            f"task {task!r} can fill at most {count(n)} tokens of context, fewer than the {target} asked"
        )
    return n


def _largest_fitting(count: Callable[[int], int], target: int, low: int, guess: int, high: int) -> int:
    """n in [low, high] with count(n) <= target < count(n + 1) (or n == high); needs count(low) <= target.

    Gallops from the guess to bracket the answer, then bisects, so a good guess costs few counts.
    """
    guess = min(max(guess, low), high)
    step = 1
    if count(guess) <= target:
        lo = guess
        while True:
            if lo == high:
                return lo
            probe = min(lo + step, high)
            if count(probe) > target:
                hi = probe
                break
            lo, step = probe, step * 2
    else:
        hi = guess
        while True:
            probe = max(hi - step, low)
            if count(probe) <= target:
                lo = probe
                break
            hi, step = probe, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


# --- haystack filler with needles --------------------------------------------------------------------


class _Filler:
    """The first sentences of a haystack, read on demand, with their running character counts."""

    def __init__(self, kind: str, seed: int):
        self._stream = haystack_sentences(kind, seed)
        self.sentences: list[str] = []
        self._chars_before = [0]  # _chars_before[i]: characters in sentences[:i]

    def take(self, n: int) -> list[str]:
        while len(self.sentences) < n:
            sentence = next(self._stream)
            self.sentences.append(sentence)
            self._chars_before.append(self._chars_before[-1] + len(sentence) + 1)
        return self.sentences[:n]

    def boundary(self, n: int, fraction: float) -> int:
        """The sentence boundary (0..n) of the first n sentences nearest to `fraction` of their text."""
        self.take(n)
        goal = fraction * self._chars_before[n]
        i = bisect.bisect_left(self._chars_before, goal, 0, n + 1)
        if i > 0 and goal - self._chars_before[i - 1] <= self._chars_before[min(i, n)] - goal:
            return i - 1
        return min(i, n)


def _needle_body(request: _Request, placements: Sequence[tuple[float, str]]) -> Callable[[int], str]:
    """body(n): n haystack sentences with each (depth, needle) inserted at its sentence boundary.

    Needles that land on one boundary keep their order in `placements` (a variable chain stays in order).
    """
    filler = _Filler(request.haystack, request.seed)

    def body(n: int) -> str:
        sentences = filler.take(n)
        inserts = sorted((filler.boundary(n, f), i, text) for i, (f, text) in enumerate(placements))
        pieces: list[str] = []
        start = 0
        for slot, _, text in inserts:
            pieces.extend(sentences[start:slot])
            pieces.append(text)
            start = slot
        pieces.extend(sentences[start:])
        return " ".join(pieces)

    return body


def _first_depth(request: _Request) -> float:
    return request.depth_rng.random() if request.depth is None else request.depth


def _distinct(make: Callable[[], str], count: int) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        value = make()
        if value not in values:
            values.append(value)
    return values


# --- the tasks ---------------------------------------------------------------------------------------


def _passkey(request: _Request) -> _Layout:
    key = str(request.rng.randint(10000, 99999))
    depth = _first_depth(request)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return _Layout(
        instruction=(
            "There is an important info hidden inside a lot of irrelevant text. "
            "Find it and memorize it. I will quiz you about the important information there."
        ),
        question="What is the pass key?",
        answer_prefix="The pass key is",
        answers=[key],
        depth=depth,
        body=_needle_body(request, [(depth, needle)]),
    )


def _magic_value(rng: random.Random, kind: str) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _niah(request: _Request, n_keys: int, n_values: int, n_queries: int, kind: str) -> _Layout:
    rng = request.rng
    keys = _distinct(lambda: random_key(rng), n_keys)
    flat_values = _distinct(lambda: _magic_value(rng, kind), n_keys * n_values)
    values = [flat_values[i * n_values : (i + 1) * n_values] for i in range(n_keys)]
    queried = rng.sample(range(n_keys), n_queries)
    answers = [value for i in queried for value in values[i]]
    one = len(answers) == 1
    noun = kind if one else f"{kind}s"

    # The first answer's needle goes at the requested depth; every other needle at a random one.
    depth = _first_depth(request)
    placements = []
    for i in range(n_keys):
        for j, value in enumerate(values[i]):
            first = i == queried[0] and j == 0
            where = depth if first else request.depth_rng.random()
            placements.append((where, f"One of the special magic {kind}s for {keys[i]} is: {value}."))
    request.depth_rng.shuffle(placements)  # needles sharing a boundary appear in no telling order

    names = [keys[i] for i in queried]
    query = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]
    if one:
        instruction = (
            f"A special magic {noun} is hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {noun} afterwards."
        )
        question = f"What is the special magic {noun} for {query} mentioned in the provided text?"
        answer_prefix = f"The special magic {noun} for {query} mentioned in the provided text is"
    else:
        instruction = (
            f"Some special magic {noun} are hidden within the following text. Make sure to memorize them. "
            f"I will quiz you about the {noun} afterwards."
        )
        question = f"What are all the special magic {noun} for {query} mentioned in the provided text?"
        answer_prefix = f"The special magic {noun} for {query} mentioned in the provided text are"
    return _Layout(
        instruction=instruction,
        question=question,
        answer_prefix=answer_prefix,
        answers=answers,
        depth=depth,
        body=_needle_body(request, placements),
    )


_VT_HOPS = 4


def _variable_tracking(request: _Request) -> _Layout:
    rng = request.rng
    names = _distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), _VT_HOPS + 1)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"]
    chain += [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(_VT_HOPS)]
    # The chain starts at the requested depth and runs, in order, somewhere between there and the end.
    depth = _first_depth(request)
    later = sorted(depth + (1.0 - depth) * request.depth_rng.random() for _ in range(_VT_HOPS))
    placements = list(zip([depth, *later], chain))
    return _Layout(
        instruction="Memorize and track the chain(s) of variable assignment hidden in the following text.",
        question=f"Question: Find all variables that are assigned the value {value} in the text above.",
        answer_prefix=(
            "Answer: According to the chain(s) of variable assignment in the text above, "
            f"{len(names)} variables are assigned the value {value}, they are:"
        ),
        answers=names,
        depth=depth,
        body=_needle_body(request, placements),
    )


_CWE_COMMON = 10


def _common_words(request: _Request) -> _Layout:
    vocabulary = common_words_vocabulary()
    words = request.rng.sample(vocabulary, len(vocabulary))
    common, uncommon = words[:_CWE_COMMON], words[_CWE_COMMON:]
    # RULER's repeats: a short list cannot afford 30 copies of each common word.
    common_repeats, uncommon_repeats = (6, 1) if request.context_tokens < 4096 else (30, 3)

    def body(n_uncommon: int) -> str:
        listed = common * common_repeats + uncommon[:n_uncommon] * uncommon_repeats
        random.Random(f"kvx-cwe-order:{request.seed}:{n_uncommon}").shuffle(listed)
        return " ".join(f"{i}. {word}" for i, word in enumerate(listed, start=1))

    return _Layout(
        instruction=(
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often."
        ),
        question=f"Question: What are the {_CWE_COMMON} most common words in the above list?",
        answer_prefix=f"Answer: The top {_CWE_COMMON} words that appear most often in the list are:",
        answers=list(common),
        depth=None,
        body=body,
        min_units=1,
        max_units=len(uncommon),
    )


_ZETA_2 = 1.6449340668482264  # sum of 1/k^2: normalises the Zipf (alpha = 2) word counts
_FWE_ANSWERS = 3


def _fwe_counts(n_words: int, vocabulary_size: int) -> list[int]:
    return [int(n_words / (k * k * _ZETA_2)) for k in range(1, vocabulary_size + 1)]


def _frequent_words(request: _Request) -> _Layout:
    rng = request.rng
    size = max(request.context_tokens // 50, 10)  # RULER's vocabulary size for a given length
    coded = _distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=6)), size - 1)
    vocabulary = ["...", *coded]  # the most frequent "word" is noise that the question says to ignore

    def body(n_words: int) -> str:
        text = [w for w, c in zip(vocabulary, _fwe_counts(n_words, size)) for _ in range(c)]
        random.Random(f"kvx-fwe-order:{request.seed}:{n_words}").shuffle(text)
        return " ".join(text)

    return _Layout(
        instruction=(
            "Read the following coded text and track the frequency of each coded word. "
            "Find the three most frequently appeared coded words."
        ),
        question=(
            "Question: Do not provide any explanation. Please ignore the dots '....'. "
            "What are the three most frequently appeared words in the above coded text?"
        ),
        answer_prefix=(
            "Answer: According to the coded text above, the three most frequently appeared words are:"
        ),
        answers=vocabulary[1 : 1 + _FWE_ANSWERS],
        depth=None,
        body=body,
        # With fewer words the Zipf counts of ranks 4 and 5 can tie, and the answer would be ambiguous.
        min_units=120,
    )


_BUILDERS: dict[str, Callable[[_Request], _Layout]] = {
    "passkey": _passkey,
    "niah_single": lambda r: _niah(r, n_keys=1, n_values=1, n_queries=1, kind="number"),
    "niah_uuid": lambda r: _niah(r, n_keys=1, n_values=1, n_queries=1, kind="uuid"),
    "niah_multikey": lambda r: _niah(r, n_keys=4, n_values=1, n_queries=1, kind="number"),
    "niah_multivalue": lambda r: _niah(r, n_keys=1, n_values=4, n_queries=1, kind="number"),
    "niah_multiquery": lambda r: _niah(r, n_keys=4, n_values=1, n_queries=4, kind="number"),
    "variable_tracking": _variable_tracking,
    "common_words": _common_words,
    "frequent_words": _frequent_words,
}
assert set(_BUILDERS) == set(TASKS)

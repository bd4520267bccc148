"""Haystacks: endless streams of filler sentences that needles are hidden in.

Two kinds, both built locally (nothing is downloaded):
- "noise": five short sentences repeated forever, as in RULER's "repeat" haystack. Every position looks
  alike, so retrieval depends only on finding the needle.
- "prose": English documentation text that CPython ships in `pydoc_data/topics.py`, split into
  sentences. Real prose is much harder for a small model (the needle competes with plausible text).
  The text is whatever the running Python ships, so it can differ between Python versions.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
from collections.abc import Iterator

from kvx.errors import KvxError

HAYSTACKS = ("noise", "prose")

NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

# A prose sentence must look like ordinary English: a sane length and ending in a full stop, so that a
# haystack "sentence" is a fine unit for filling to a token count and for placing needles.
_MIN_WORDS, _MAX_WORDS = 5, 50
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
_EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
_MARKUP = re.compile(r"::=|>>>|\.\.\.\s*$|^\s*[-*=~^\"#+]{3,}\s*$", re.MULTILINE)


def haystack_sentences(kind: str, seed: int) -> Iterator[str]:
    """An endless iterator over the sentences of haystack `kind`; the order depends only on `seed`."""
    if kind == "noise":
        return itertools.cycle(NOISE_SENTENCES)
    if kind == "prose":
        return _prose_stream(seed)
    raise KvxError(f"unknown haystack {kind!r}; choose one of: {', '.join(HAYSTACKS)}")


def _prose_stream(seed: int) -> Iterator[str]:
    # Topics are shuffled as whole documents (sentences inside a topic keep their order, so the text reads
    # as prose); each pass over all topics uses a fresh, seed-derived order.
    topics = prose_topics()
    names = sorted(topics)
    for round_index in itertools.count():
        order = list(names)
        random.Random(f"kvx-prose:{seed}:{round_index}").shuffle(order)
        for name in order:
            yield from topics[name]


@functools.lru_cache(maxsize=1)
def prose_topics() -> dict[str, tuple[str, ...]]:
    """Sentences of every pydoc topic that has at least one usable sentence, by topic name."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some stripped-down Python builds leave pydoc_data out
        raise KvxError("the 'prose' haystack needs pydoc_data, which this Python lacks; use 'noise'") from exc
    result = {}
    for name, text in topics.items():
        sentences = tuple(_sentences(text))
        if sentences:
            result[name] = sentences
    return result


def _sentences(text: str) -> Iterator[str]:
    for paragraph in re.split(r"\n\s*\n", text):
        if _is_code_or_markup(paragraph):
            continue
        flat = _EMPHASIS.sub(r"\1", " ".join(paragraph.split()))
        for sentence in _SENTENCE_END.split(flat):
            if _is_plain_sentence(sentence):
                yield sentence


def _is_code_or_markup(paragraph: str) -> bool:
    lines = [line for line in paragraph.splitlines() if line.strip()]
    if not lines:
        return True
    # Indented blocks are code samples or grammar; list items ("* ...") are kept.
    indented = all(line.startswith((" ", "\t")) for line in lines)
    return indented or bool(_MARKUP.search(paragraph))


def _is_plain_sentence(sentence: str) -> bool:
    words = sentence.split()
    if not (_MIN_WORDS <= len(words) <= _MAX_WORDS):
        return False
    if not sentence[0].isupper() or sentence[-1] != ".":
        return False
    # Reject leftovers of code and reST markup: backquotes, "*emphasis*", brackets, "a.b(c)" and such.
    return not any(ch in sentence for ch in "`*[]{}<>|=\\") and "()" not in sentence


def filler_ids(tokenizer, n_tokens: int, first: bool = True) -> list[int]:
    """At least n_tokens ids of English prose (CPython's pydoc_data), the same on every run."""
    try:
        prose_topics()
        sentences = haystack_sentences("prose", seed=0)
    except KvxError:  # a Python without pydoc_data
        sentences = haystack_sentences("noise", seed=0)
    text, chars = "", 6 * n_tokens + 64
    while True:
        while len(text) < chars:
            text += next(sentences) + " "
        ids = tokenizer.encode(text, add_special_tokens=first)
        if len(ids) >= n_tokens:
            return ids
        chars *= 2

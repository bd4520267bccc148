"""RULER's scores: does the prediction contain the reference answers (case-insensitive substrings)?

RULER scores its synthetic tasks (every niah variant, variable tracking, common and frequent words)
with string_match_all, the fraction of the references found in the prediction, so naming 3 of 4 values
scores 0.75; only its QA tasks use string_match_part, 1.0 when any reference is found. kvx has no QA
task, so every task here is scored with `score_all`.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvx.errors import KvxError

# Tasks scored with string_match_part; RULER uses it for its QA tasks only, which kvx does not generate.
PART_MATCH_TASKS: frozenset[str] = frozenset()


def score_all(prediction: str, answers: Sequence[str]) -> float:
    """The fraction of `answers` that occur in `prediction` (RULER's string_match_all)."""
    found = _found(prediction, answers)
    return sum(found) / len(found)


def score_part(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any of `answers` occurs in `prediction`, else 0.0 (RULER's string_match_part)."""
    return 1.0 if any(_found(prediction, answers)) else 0.0


def score_sample(sample, prediction: str) -> float:
    """The score of `prediction` for `sample` (anything with .task and .answers), as RULER scores it."""
    if sample.task in PART_MATCH_TASKS:
        return score_part(prediction, sample.answers)
    return score_all(prediction, sample.answers)


def _found(prediction: str, answers: Sequence[str]) -> list[bool]:
    if not answers:
        raise KvxError("cannot score a prediction against an empty list of answers")
    # casefold() is lower() made for caseless matching (e.g. German sharp s).
    text = prediction.casefold()
    return [answer.casefold() in text for answer in answers]

"""Word lists for the synthetic tasks, all local.

Needle keys are adjective-noun pairs ("brave-lantern"), as RULER's keys are; the lists below are short,
concrete and unambiguous so that a key never collides with haystack prose, and no adjective ends another
one, so no key is part of another key. The common-words task needs
thousands of distinct real words; those come from the prose haystack's own vocabulary.
"""

from __future__ import annotations

import functools
import random
import re

from kvx.eval.haystack import prose_topics

ADJECTIVES = (
    "ancient", "angry", "bitter", "brave", "bright", "broken", "busy", "calm", "careful", "cheerful",
    "clever", "cloudy", "crooked", "curious", "damp", "dusty", "eager", "elegant", "empty", "fancy",
    "fierce", "fragile", "frozen", "gentle", "giant", "golden", "graceful", "grumpy", "hidden", "hollow",
    "humble", "frosty", "jolly", "lazy", "little", "lively", "lonely", "lucky", "marble", "mighty",
    "misty", "modern", "muddy", "narrow", "noisy", "odd", "orange", "patient", "polite", "proud",
    "purple", "quiet", "rapid", "rusty", "sandy", "scarlet", "shiny", "silent", "silver", "sleepy",
    "smooth", "sour", "spicy", "steady", "sticky", "stormy", "sturdy", "sunny", "swift", "tender",
    "tiny", "velvet", "wandering", "warm", "wicked", "wild", "wise", "wooden", "young", "zealous",
)

NOUNS = (
    "anchor", "apple", "badger", "balloon", "basket", "beacon", "bicycle", "blanket", "bottle", "bridge",
    "bucket", "butterfly", "cabin", "camel", "candle", "canyon", "carpet", "castle", "cherry", "chimney",
    "cloud", "compass", "cottage", "crayon", "dolphin", "dragon", "drum", "eagle", "falcon", "feather",
    "fountain", "garden", "giraffe", "glacier", "harbor", "helmet", "island", "jacket", "kettle", "kitten",
    "ladder", "lantern", "lemon", "lighthouse", "meadow", "mirror", "monkey", "mountain", "nest", "ocean",
    "orchard", "otter", "owl", "paddle", "parrot", "pebble", "pencil", "pillow", "pirate", "planet",
    "pumpkin", "puzzle", "rabbit", "river", "rocket", "saddle", "sailor", "scarf", "shovel", "sparrow",
    "squirrel", "statue", "teapot", "tiger", "tractor", "trumpet", "tulip", "turtle", "violin", "walrus",
)

_PROSE_WORD = re.compile(r"(?<![\w.\"'’-])[a-z]{4,12}(?![\w\"'’(-])")


def random_key(rng: random.Random) -> str:
    """An adjective-noun key such as "brave-lantern"."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


@functools.lru_cache(maxsize=1)
def common_words_vocabulary() -> tuple[str, ...]:
    """Distinct lowercase English words from the prose haystack (4 to 12 letters) and the key lists.

    No word is part of another ("list" is dropped because of "lists"), so that substring scoring
    cannot credit an answer for naming a longer word.
    """
    words: set[str] = set(ADJECTIVES) | set(NOUNS)
    for sentences in prose_topics().values():
        for sentence in sentences:
            words.update(_PROSE_WORD.findall(sentence))
    blob = "\n".join(words)  # a word that occurs in the blob more than once is part of another word
    return tuple(sorted(w for w in words if blob.count(w) == 1))

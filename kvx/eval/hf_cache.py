"""Passing a KV cache to Hugging Face transformers' models, across the rename of `past_key_values`.

transformers 5.x renamed the forward argument and the output field `past_key_values` to `cache` (the old
names warn, and go in 5.40); the 4.x releases know only the old ones. kvx
compares itself with transformers in `kvx bench` and in the tests, so both go through these two functions.
"""

from __future__ import annotations

import inspect


def cache_arg(model) -> str:
    """The name of model.forward's KV-cache argument in this version ("cache" or "past_key_values").
    Look it up once, outside a timed loop: inspecting a signature costs more than a tiny model's step."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_of(output):
    """The KV cache a forward pass returned (`output.cache`, or `output.past_key_values` before 5.x)."""
    fields = output.keys() if hasattr(output, "keys") else ()
    if "cache" in fields:
        return output["cache"]
    return output.past_key_values

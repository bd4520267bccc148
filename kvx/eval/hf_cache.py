"""Passing a KV cache to Hugging Face transformers' models, across the rename of `past_key_values`.

transformers 5.x renamed the forward argument and the output field `past_key_values` to `cache` (the old
names warn, and go in 5.40); the 4.x releases (the GPU image's among them) know only the old ones. kvx
compares itself with transformers in `kvx bench` and in the tests, so both go through these two functions.
"""

from __future__ import annotations

import inspect


def cache_kwargs(model, cache) -> dict:
    """The keyword argument that hands `cache` to model.forward, under the name this version expects."""
    params = inspect.signature(type(model).forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def cache_of(output):
    """The KV cache a forward pass returned (`output.cache`, or `output.past_key_values` before 5.x)."""
    fields = output.keys() if hasattr(output, "keys") else ()
    if "cache" in fields:
        return output["cache"]
    return output.past_key_values

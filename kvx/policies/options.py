"""Turning `key=value` strings into the typed options of a scorer or allocator dataclass.

Each option is a dataclass field; its type annotation says how to parse the text, and its metadata may
give `choices`, `min`, `max` and `help`.
"""

from __future__ import annotations

import math
from dataclasses import Field, fields

from kvx.errors import KvxError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def option_fields(cls) -> list[Field]:
    return list(fields(cls))


def parse_option(owner: str, f: Field, text: str):
    """The typed value of option f from text, or KvxError naming the option and what it accepts."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    raw = text.strip()
    where = f"option {f.name}={text!r} of {owner}"
    optional = "None" in kind
    if optional and raw.lower() in ("auto", "none", ""):
        return None
    choices = f.metadata.get("choices")
    if choices is not None:
        if raw.lower() not in choices:
            raise KvxError(f"{where}: expected one of {', '.join(choices)}")
        return raw.lower()
    if kind.startswith("bool"):
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise KvxError(f"{where}: expected true or false")
    if kind.startswith("int"):
        try:
            value = int(raw)
        except ValueError:
            extra = " or auto" if optional else ""
            raise KvxError(f"{where}: expected a whole number{extra}") from None
    elif kind.startswith("float"):
        try:
            value = float(raw)
        except ValueError:
            raise KvxError(f"{where}: expected a number") from None
        if not math.isfinite(value):
            raise KvxError(f"{where}: expected a finite number")
    else:
        value = raw
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if low is not None and value < low:
        raise KvxError(f"{where}: must be at least {low:g}")
    if high is not None and value > high:
        raise KvxError(f"{where}: must be at most {high:g}")
    return value


def describe_options(cls) -> list[tuple[str, str, str]]:
    """(name, default, help) of every option of a scorer or allocator class."""
    out = []
    for f in option_fields(cls):
        default = "auto" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
        out.append((f.name, default, f.metadata.get("help", "")))
    return out

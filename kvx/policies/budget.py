"""How much of the KV cache a policy keeps.

`--budget 5%` keeps 5% of the context's (layer, kv head, token) entries counted over the whole model;
`--budget 512` keeps 512 tokens per kv head on average. Protected tokens (sinks, observation window)
count against the budget. Every (layer, kv head) keeps at least one entry: attention over an empty
segment is undefined.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from kvx.errors import KvxError


def _round_half_up(x: float) -> int:
    # A tiny slack so that 0.05 * 1000 (= 50.000000000000007 or 49.99999999) lands on 50.
    return int(math.floor(x + 0.5 + 1e-9))


@dataclass(frozen=True)
class Budget:
    fraction: float | None = None  # share of all entries kept, in (0, 1]
    tokens: int | None = None  # average kept tokens per kv head, >= 1

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.tokens is None):
            raise ValueError("a Budget has exactly one of fraction and tokens")

    def per_head(self, n_tokens: int) -> int:
        """Average kept tokens per kv head for a context of n_tokens (at least 1, at most n_tokens)."""
        if n_tokens <= 0:
            return 0
        k = _round_half_up(self.fraction * n_tokens) if self.fraction is not None else self.tokens
        return max(1, min(n_tokens, k))

    def total_entries(self, n_tokens: int, num_layers: int, num_kv_heads: int) -> int:
        """Entries kept over the whole model: the budget, clipped to what exists, at least one per head."""
        heads = num_layers * num_kv_heads
        available = heads * max(n_tokens, 0)
        if self.fraction is not None:
            wanted = _round_half_up(self.fraction * available)
        else:
            wanted = self.tokens * heads
        return min(available, max(wanted, heads))

    def keeps_everything(self, n_tokens: int) -> bool:
        if self.fraction is not None:
            return self.fraction >= 1.0
        return self.tokens >= n_tokens

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        return str(self.tokens)


_PERCENT = re.compile(r"^([0-9]*\.?[0-9]+)\s*%$")
_INTEGER = re.compile(r"^[0-9]+$")


def parse_budget(text: str) -> Budget:
    """'5%' -> fraction 0.05; '512' -> 512 tokens per kv head. KvxError for anything else."""
    raw = text.strip() if isinstance(text, str) else ""
    hint = "use a percentage such as 5% or a whole number of tokens per kv head such as 512"
    if not raw:
        raise KvxError(f"empty budget; {hint}")
    if raw.endswith("%"):
        match = _PERCENT.match(raw)
        if match is None:
            raise KvxError(f"invalid budget {text!r}; {hint}")
        percent = float(match.group(1))
        if not 0.0 < percent <= 100.0:
            raise KvxError(f"budget {text!r} is out of range; a percentage must be above 0% and at most 100%")
        return Budget(fraction=percent / 100.0)
    if _INTEGER.match(raw):
        tokens = int(raw)
        if tokens <= 0:
            raise KvxError(f"budget {text!r} keeps nothing; a token budget must be at least 1")
        return Budget(tokens=tokens)
    if re.match(r"^[+-]?[0-9]*\.?[0-9]+$", raw):
        if raw.startswith("-") or float(raw) <= 0:
            raise KvxError(f"budget {text!r} must be positive; {hint}")
        if "." in raw:
            raise KvxError(f"budget {text!r} is not a whole number of tokens; {hint}")
    raise KvxError(f"invalid budget {text!r}; {hint}")

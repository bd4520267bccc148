"""Next-token sampling: greedy by default, temperature / top-k / top-p with a seeded generator."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: checking options must not wait for it
    import torch
    from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0  # 1 means no nucleus cut
    seed: int = 0


SEED_MAX = 2**64 - 1  # torch generators take any seed in [0, 2^64)


def sampling_problem(params: SamplingParams) -> tuple[str, str] | None:
    """(field, what is wrong with it) for the first value sampling cannot use; None when all are fine.

    top_p must stay above 0: at 0 the nucleus would drop every token, even the most likely one.
    """
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    t, p, k, s = params.temperature, params.top_p, params.top_k, params.seed
    if not number(t) or t < 0:
        return "temperature", f"must be a finite number at least 0 (0 = greedy), got {t!r}"
    if not number(p) or not 0 < p <= 1:
        return "top_p", f"must be above 0 and at most 1, got {p!r}"
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        return "top_k", f"must be a whole number at least 0 (0 = no cut), got {k!r}"
    if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= SEED_MAX:
        return "seed", f"must be a whole number from 0 to 2^64-1, got {s!r}"
    return None


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator:
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from logits [V], of any dtype on any device: greedy reads them where they are
    (a GPU sends back one index, not the vocabulary); sampling copies them to the host, where the seeded
    generator lives, as float32."""
    import torch

    if params.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float().cpu()
    # Shift the top logit to 0 before dividing: a tiny temperature then sends the others to -inf, never
    # the top one to inf (inf - inf in the softmax was a NaN).
    # The temperature is floored at a float32-representable 1e-30 (1e-300 would round to 0: 0 / 0).
    logits = (logits - logits.max()) / max(params.temperature, 1e-30)
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop[0] = False  # even a top_p that rounds to 0 in float32 keeps the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))

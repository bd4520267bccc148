"""KV-cache eviction policies: scorers (token importance) + allocators (entries per layer and kv head).

    policy = build_policy("snapkv", allocation="ada", args={"window": "16"})
    keep = policy.select(stats, parse_budget("5%"), num_kv_heads, num_heads, head_dim)

The names below are imported on first use (PEP 562): `from kvx.policies import parse_budget` must not
import torch, so that the command line checks a budget at once, before anything heavy loads.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "DecodeView": "base", "ScoreContext": "base", "Scorer": "base",
    "Budget": "budget", "parse_budget": "budget",
    "Policy": "policy",
    "ALLOCATOR_NAMES": "registry", "ALLOCATORS": "registry", "POLICY_NAMES": "registry",
    "SCORER_NAMES": "registry", "SCORERS": "registry", "PolicyInfo": "registry", "build_policy": "registry",
    "describe_policies": "registry",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value

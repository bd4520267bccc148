"""KV-cache eviction policies: scorers (token importance) + allocators (entries per layer and kv head).

    policy = build_policy("snapkv", allocation="ada", args={"window": "16"})
    keep = policy.select(stats, parse_budget("5%"), num_kv_heads, num_heads, head_dim)
"""

from kvx.policies.base import DecodeView, ScoreContext, Scorer
from kvx.policies.budget import Budget, parse_budget
from kvx.policies.policy import Policy
from kvx.policies.registry import (
    ALLOCATOR_NAMES,
    ALLOCATORS,
    POLICY_NAMES,
    SCORER_NAMES,
    SCORERS,
    PolicyInfo,
    build_policy,
    describe_policies,
)

__all__ = [
    "ALLOCATORS",
    "ALLOCATOR_NAMES",
    "Budget",
    "DecodeView",
    "POLICY_NAMES",
    "Policy",
    "PolicyInfo",
    "SCORERS",
    "SCORER_NAMES",
    "ScoreContext",
    "Scorer",
    "build_policy",
    "describe_policies",
    "parse_budget",
]

"""A request's compression: its kv_* fields over the server's flags.

Each field defaults to the server's flag. kv_allocation and kv_policy_args default to the server's only
when the request keeps the server's policy: options belong to a policy, so a request naming another policy
starts from that policy's own defaults. A budget with no policy to apply it to is an error rather than a
full cache the client did not ask for. Every request gets a Policy object of its own (policies keep
per-model state).
"""

from __future__ import annotations

from kvx.errors import KvxError
from kvx.serve.errors import bad_request
from kvx.serve.settings import RequestDefaults


def _policy_args(value) -> list[str]:
    """kv_policy_args as the CLI's --policy-arg items: a dict, a list of 'k=v', or 'k=v,k=v'."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in value.items()]
    return [value] if isinstance(value, str) else list(value)


def resolve(defaults: RequestDefaults, policy=None, budget=None, allocation=None, policy_args=None):
    """(Policy, Budget) for the request, (None, None) for the full cache; ApiError 400 naming the field."""
    from kvx.options import parse_policy_args
    from kvx.policies import ALLOCATOR_NAMES, POLICY_NAMES, build_policy, parse_budget

    default = defaults.policy.strip().lower()
    name = default if policy is None else policy.strip().lower()
    inherit = name == default
    if allocation is None and inherit:
        allocation = defaults.allocation
    args_items = list(defaults.policy_args) if policy_args is None and inherit else _policy_args(policy_args)
    budget_text = defaults.budget if budget is None else str(budget)

    if name not in POLICY_NAMES:
        raise bad_request(f"unknown kv_policy {name!r}; choose one of: {', '.join(POLICY_NAMES)}", "kv_policy")
    if allocation is not None and allocation.strip().lower() not in ALLOCATOR_NAMES:
        raise bad_request(f"unknown kv_allocation {allocation!r}; choose one of: {', '.join(ALLOCATOR_NAMES)}",
                          "kv_allocation")
    if name == "full":
        if budget is not None:
            why = "kv_policy full keeps everything" if policy is not None else "the server's default policy is full"
            raise bad_request(f"kv_budget needs a kv_policy that compresses ({why}); see `kvx policies`", "kv_budget")
        if policy_args:
            raise bad_request("kv_policy full keeps everything and takes no kv_policy_args", "kv_policy_args")
        return None, None
    if budget_text is None:
        raise bad_request(f"kv_policy {name} needs a kv_budget (e.g. \"5%\" or 512 tokens per kv head)", "kv_budget")
    try:
        parsed_budget = parse_budget(budget_text)
    except KvxError as exc:
        raise bad_request(str(exc), "kv_budget") from None
    try:
        pol = build_policy(name, allocation=allocation, args=parse_policy_args(args_items))
    except KvxError as exc:
        raise bad_request(str(exc), "kv_policy_args") from None
    return pol, parsed_budget

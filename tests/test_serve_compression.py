"""A request's kv_* fields over the server's flags (kvx/serve/compression.py): no server needed."""

from __future__ import annotations

import pytest

from kvx.policies import build_policy
from kvx.serve.compression import resolve
from kvx.serve.errors import ApiError
from kvx.serve.settings import RequestDefaults

SERVER = RequestDefaults(policy="SnapKV", budget="10%", allocation="pyramid", policy_args=("window=8",))


def test_the_servers_flags_are_the_defaults():
    pol, bud = resolve(SERVER)
    assert pol.name == "snapkv" and str(bud) == "10%" and pol.window == 8
    assert type(pol.allocator) is type(build_policy("snapkv", allocation="pyramid").allocator)


def test_a_request_overrides_field_by_field():
    pol, bud = resolve(SERVER, budget="5%")
    assert pol.name == "snapkv" and str(bud) == "5%" and pol.window == 8  # same policy: options inherited
    pol, bud = resolve(SERVER, budget=256, policy_args={"window": 4, "kernel": 3})
    assert str(bud) == "256" and pol.window == 4 and pol.scorer.kernel == 3
    pol, _ = resolve(SERVER, policy_args="window=16,kernel=5")
    assert pol.window == 16 and pol.scorer.kernel == 5


def test_another_policy_starts_from_its_own_options():
    pol, bud = resolve(SERVER, policy="ada-snapkv")
    own = build_policy("ada-snapkv")
    assert pol.name == "ada-snapkv" and str(bud) == "10%" and pol.window == own.window
    assert type(pol.allocator) is type(own.allocator)


def test_full_and_a_new_policy_object_per_request():
    assert resolve(SERVER, policy="full") == (None, None)
    assert resolve(RequestDefaults()) == (None, None)
    assert resolve(SERVER)[0] is not resolve(SERVER)[0]


@pytest.mark.parametrize("fields, param", [
    ({"policy": "nope"}, "kv_policy"),
    ({"budget": "5 percent"}, "kv_budget"),
    ({"allocation": "spiral"}, "kv_allocation"),
    ({"policy_args": {"nope": 1}}, "kv_policy_args"),
    ({"policy": "full", "budget": "5%"}, "kv_budget"),
    ({"policy": "full", "policy_args": {"window": 4}}, "kv_policy_args"),
])
def test_a_bad_field_is_a_400_naming_it(fields, param):
    with pytest.raises(ApiError) as err:
        resolve(SERVER, **fields)
    assert err.value.status == 400 and err.value.param == param

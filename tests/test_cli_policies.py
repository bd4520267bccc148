"""`kvx policies` and the policy options of `kvx generate`, run as a user runs them (`python -m kvx`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvx.policies import POLICY_NAMES, describe_policies


def kvx(*args: str, timeout: float = 300, **env_vars: str) -> subprocess.CompletedProcess:
    # One intra-op thread: the test machine is shared, and oversubscribed threads make each op wait.
    # A wide terminal so that rich never folds a policy name in the table.
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="300", **env_vars)
    return subprocess.run([sys.executable, "-m", "kvx", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def paper_id(info) -> str | None:
    first = info.paper.split()[0]
    return None if first == "-" else first


def test_policies_table_lists_every_policy_with_its_paper():
    out = kvx("policies")
    assert out.returncode == 0, out.stderr
    for info in describe_policies():
        assert info.name in out.stdout
        if paper_id(info):
            assert paper_id(info) in out.stdout
    assert {"2506.03762", "2605.07234", "2407.11550"} <= {paper_id(i) for i in describe_policies()}
    assert "uniform, pyramid, ada, global" in out.stdout


def test_policies_json_is_one_object_per_line():
    out = kvx("policies", "--json")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    objects = [json.loads(line) for line in lines]
    assert [o["name"] for o in objects] == POLICY_NAMES
    for obj, info in zip(objects, describe_policies()):
        assert isinstance(obj, dict)
        assert obj["paper"] == info.paper
        assert obj["allocation"] == info.allocation
        assert set(obj["phases"]) <= {"prefill", "decode"} and obj["phases"]
        assert [tuple(o) for o in obj["options"]] == [tuple(o) for o in info.options]
    by_name = {o["name"]: o for o in objects}
    assert by_name["laprox"]["allocation"] == "global"
    assert "decode" in by_name["ahakv"]["phases"] and "decode" in by_name["h2o"]["phases"]


@pytest.mark.slow
def test_generate_with_a_budget_reports_the_bytes_it_holds():
    prompt = " ".join(["The grass is green. The sky is blue. The sun is yellow."] * 60) + " What color is the sky?"
    out = kvx("generate", "--policy", "snapkv", "--budget", "10%", "--json", "--quiet", "-n", "4", prompt)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["policy"] == "snapkv" and result["budget"] == "10%"
    assert result["prompt_tokens"] > 600 and result["generated_tokens"] == 4
    # 10% of the prompt's entries (plus the tokens decoded since) against the full cache of the same tokens;
    # allocated = in use + a headroom of 4 tokens per head, named as such.
    assert result["kv_entries_kept"] <= 0.11 * result["kv_entries_full"]
    assert result["kv_kept_fraction"] == pytest.approx(result["kv_entries_kept"] / result["kv_entries_full"], abs=1e-6)
    assert result["kv_bytes_in_use"] <= 0.11 * result["kv_bytes_full"]
    assert result["kv_bytes_allocated"] == result["kv_bytes_in_use"] + result["kv_bytes_headroom"]
    assert result["kv_bytes_allocated"] < 0.15 * result["kv_bytes_full"]
    assert "kv_bytes_held" not in result


# (arguments, a word the one error line must contain)
BAD_OPTIONS = {
    "zero tokens": (["--policy", "snapkv", "--budget", "0"], "budget '0'"),
    "zero percent": (["--policy", "snapkv", "--budget", "0%"], "budget '0%'"),
    "negative": (["--policy", "snapkv", "--budget", "-5"], "budget '-5'"),
    "over 100%": (["--policy", "snapkv", "--budget", "150%"], "budget '150%'"),
    "not a number": (["--policy", "snapkv", "--budget", "abc"], "budget 'abc'"),
    "unknown policy": (["--policy", "nope", "--budget", "5%"], "unknown policy 'nope'"),
    "unknown allocation": (["--policy", "snapkv", "--budget", "5%", "--allocation", "nope"], "allocation 'nope'"),
    "bad option value": (["--policy", "snapkv", "--budget", "5%", "--policy-arg", "window=abc"], "window"),
    "unknown option": (["--policy", "snapkv", "--budget", "5%", "--policy-arg", "bogus=1"], "bogus"),
    "option without =": (["--policy", "snapkv", "--budget", "5%", "--policy-arg", "window"], "key=value"),
    "policy without budget": (["--policy", "snapkv"], "--budget"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_policy_options_are_one_line_errors(case, tmp_path):
    args, word = BAD_OPTIONS[case]
    # An empty model cache: the options must be refused before any model is looked for (or downloaded).
    out = kvx("generate", *args, "hello", timeout=60, KVX_HOME=str(tmp_path / "empty"))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvx: error: "), out.stderr
    assert word in lines[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "empty").exists()
    if case == "unknown policy":
        assert all(name in lines[0] for name in POLICY_NAMES)

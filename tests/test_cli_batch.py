"""`kvx generate --jsonl` over the batched engine, through the installed command: per-line policies in one
batch give what each line gets alone (--max-batch 1), --ordered keeps input order, a bad line gets its
error object while the others run, bad batch options exit 2 with one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli_checks import run_with_terminal_stderr
from kvx.models.hub import pull_default_model

pytestmark = pytest.mark.slow

LINES = [
    {"id": "paris", "prompt": "What is the capital of France?", "max_tokens": 12},
    {"id": "snap", "prompt": "Name three primary colors.", "policy": "snapkv", "budget": "50%", "max_tokens": 12},
    "{broken",
    {"id": "h2o", "prompt": "Write one sentence about the sea.", "policy": "h2o", "budget": "60%",
     "policy_args": {"sinks": 4}, "max_tokens": 12},
    {"id": "bad-policy", "prompt": "hi", "policy": "no-such-policy", "budget": "5%"},
    {"id": "ctx", "context": "Alice keeps a red umbrella. Bob has a green one.", "policy": "ada-snapkv",
     "budget": "70%", "questions": ["What color is Alice's umbrella?", "Who has the green one?"], "max_tokens": 10},
    {"id": "tova", "prompt": "Count from one to five.", "policy": "tova", "budget": "50%", "max_tokens": 12},
]


@pytest.fixture(scope="module")
def default_dir():
    return pull_default_model(quiet=True)


def kvx(*args, stdin: str = "", timeout: int = 600) -> subprocess.CompletedProcess:
    exe = [sys.executable, "-m", "kvx"]
    return subprocess.run([*exe, *args], input=stdin, capture_output=True, text=True, timeout=timeout)


def _stdin() -> str:
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in LINES) + "\n"


def _texts(out: list[dict]) -> dict:
    return {o["line"]: (o.get("text"), [r["text"] for r in o.get("results", [])], o.get("error") is not None)
            for o in out}


def test_a_batch_of_mixed_policies_equals_each_line_alone(default_dir):
    batched = kvx("generate", "--jsonl", "--max-batch", "8", "--kv-memory", "256MiB", "--quiet", stdin=_stdin())
    alone = kvx("generate", "--jsonl", "--max-batch", "1", "--ordered", "--quiet", stdin=_stdin())
    assert batched.returncode == 1 and alone.returncode == 1  # two lines fail in both
    b = [json.loads(x) for x in batched.stdout.splitlines()]
    a = [json.loads(x) for x in alone.stdout.splitlines()]
    assert [o["line"] for o in a] == list(range(1, len(LINES) + 1))  # --ordered
    assert sorted(o["line"] for o in b) == list(range(1, len(LINES) + 1))  # nothing lost
    assert _texts(b) == _texts(a)
    by_id = {o["id"]: o for o in b if o.get("id")}
    assert "Paris" in by_id["paris"]["text"]
    assert "error" in by_id["bad-policy"] and "no-such-policy" in by_id["bad-policy"]["error"]
    assert by_id["snap"]["policy"] == "snapkv" and by_id["snap"]["kv_entries_kept"] < by_id["snap"]["kv_entries_full"]
    assert [r["question"] for r in by_id["ctx"]["results"]] == LINES[5]["questions"]
    assert all(o["line"] == 3 for o in b if o.get("id") is None)


def test_prefills_split_into_small_pieces_give_the_same_lines(default_dir):
    """--prefill-step 8: every prompt (a chat template of ~30 tokens and more) is prefilled in several exact
    pieces between the other lines' decode steps; every line's answer is the one-shot prefill's. In float32:
    the CPU's packed int8 weights (--dtype auto) run a prompt of more than 64 rows through a bfloat16
    matmul whose rounding depends on how many rows it is given, so only float32 makes pieces and the
    whole bit-identical."""
    f32 = ("--dtype", "float32")
    split = kvx("generate", "--jsonl", "--max-batch", "8", "--prefill-step", "8", "--ordered", "--quiet", *f32,
                stdin=_stdin())
    alone = kvx("generate", "--jsonl", "--max-batch", "1", "--ordered", "--quiet", *f32, stdin=_stdin())
    assert split.returncode == alone.returncode == 1, split.stderr  # the same two lines fail
    assert _texts([json.loads(x) for x in split.stdout.splitlines()]) == \
        _texts([json.loads(x) for x in alone.stdout.splitlines()])
    # --prefill-first: the same lines, decoded once the batch is full.
    first = kvx("generate", "--jsonl", "--max-batch", "8", "--prefill-step", "8", "--prefill-first", "--ordered",
                "--quiet", *f32, stdin=_stdin())
    assert first.returncode == 1, first.stderr
    assert _texts([json.loads(x) for x in first.stdout.splitlines()]) == \
        _texts([json.loads(x) for x in alone.stdout.splitlines()])


@pytest.mark.parametrize("args,fragment", [
    (["--max-batch", "0"], "--max-batch"),
    (["--kv-memory", "lots"], "memory size"),
    (["--kv-memory", "0"], "memory"),
])
def test_bad_batch_options_exit_2(args, fragment):
    proc = kvx("generate", "--jsonl", *args, stdin="")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvx: error:") and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_terminal_sees_a_live_status_line_and_a_pipe_does_not(default_dir):
    """stderr on a terminal (a pty here): the status line counts results, failures and running requests,
    and a bad line's message still shows; stdout carries only the results."""
    lines = [{"id": "a", "prompt": "Hi", "max_tokens": 4}, "{broken", {"id": "b", "prompt": "Hello", "max_tokens": 4}]
    stdin = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    code, out, terminal = run_with_terminal_stderr(["generate", "--jsonl"], stdin)
    assert code == 1  # one line failed
    assert "kvx: line 2: malformed JSON" in terminal
    assert "2 done, 1 failed · 0 running, 0 waiting · KV" in terminal and "tok/s" in terminal, terminal[-2000:]
    results = [json.loads(x) for x in out.splitlines()]
    assert sorted(r["line"] for r in results) == [1, 2, 3] and sum("error" in r for r in results) == 1

    piped = kvx("generate", "--jsonl", stdin=stdin)
    assert piped.stderr.strip().splitlines() == ["kvx: line 2: malformed JSON: Expecting property name enclosed "
                                                 "in double quotes at column 2"]

"""The command line as a user meets it: stdout/stderr split, --json, --jsonl, errors (one line, exit 2)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from cli_checks import run_with_terminal_stderr
from kvx.models.hub import pull_default_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_dir():
    return pull_default_model(quiet=True)


def kvx(*args, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvx", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kvx: error:")
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert proc.stdout == ""


def test_version_and_help():
    assert kvx("--version").stdout.startswith("kvx ")
    help_text = kvx("--help").stdout
    for command in ("generate", "policies", "pull", "convert"):
        assert command in help_text
    gen_help = kvx("generate", "--help").stdout
    for option in ("--policy", "--budget", "--context", "--jsonl", "--max-tokens"):
        assert option in gen_help


def test_generate_text_on_stdout_summary_on_stderr(default_dir):
    proc = kvx("generate", "What is the capital of France?", "--max-tokens", "24")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "tok/s" not in proc.stdout
    assert "tok/s" in proc.stderr and "KV kept" in proc.stderr and "decode headroom" in proc.stderr
    assert "KV held" not in proc.stderr  # headroom is not "held" against a full cache that excludes it


def test_prompt_from_stdin_and_json(default_dir):
    proc = kvx("generate", "--json", "--max-tokens", "16", stdin="What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    assert "Paris" in obj["text"]
    for key in ("prompt_tokens", "generated_tokens", "timings", "kv_entries_kept", "kv_entries_full",
                "kv_bytes_in_use", "kv_bytes_full", "kv_bytes_headroom", "kv_bytes_allocated", "kv_bytes_peak"):
        assert key in obj
    # The full cache keeps every entry: in use equals the full cache of the same tokens.
    assert obj["kv_entries_kept"] == obj["kv_entries_full"] and obj["kv_bytes_in_use"] == obj["kv_bytes_full"] > 0
    assert obj["kv_bytes_allocated"] == obj["kv_bytes_in_use"] + obj["kv_bytes_headroom"]


def test_seeded_sampling_is_deterministic(default_dir):
    args = ("generate", "Tell me a story about a cat.", "-t", "0.9", "--seed", "5", "-n", "20", "--quiet")
    a, b = kvx(*args), kvx(*args)
    assert a.returncode == 0 and a.stdout == b.stdout


def test_jsonl_pipeline_with_a_bad_line(default_dir):
    lines = [
        json.dumps({"id": "a", "prompt": "What is the capital of France?", "max_tokens": 16}),
        "{not json",
        json.dumps({"id": "c", "prompt": ""}),
        json.dumps({"id": "d", "context": "Alice keeps a red umbrella. Bob has a green one.",
                    "questions": ["What color is Alice's umbrella?", "Who has a green umbrella?"], "max_tokens": 12}),
    ]
    proc = kvx("generate", "--jsonl", stdin="\n".join(lines) + "\n")
    assert proc.returncode == 1
    # Results are written as each finishes (errors at once); "line" says which input line each answers.
    out = sorted((json.loads(line) for line in proc.stdout.strip().splitlines()), key=lambda o: o["line"])
    assert len(out) == 4 and [o["line"] for o in out] == [1, 2, 3, 4]
    assert out[0]["id"] == "a" and "Paris" in out[0]["text"]
    assert "error" in out[1] and out[1]["line"] == 2
    assert "error" in out[2] and out[2]["id"] == "c"
    assert len(out[3]["results"]) == 2



def test_a_budget_that_leaves_a_short_prompt_a_handful_of_tokens_says_so(default_dir):
    short = "What is the capital of France?"
    proc = kvx("generate", "--policy", "snapkv", "--budget", "5%", "--max-tokens", "4", short)
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.startswith("kvx: note:")]
    assert len(notes) == 1 and "--budget 5%" in notes[0] and "tokens per kv head" in notes[0], proc.stderr
    assert "note" not in proc.stdout
    quiet = kvx("generate", "--policy", "snapkv", "--budget", "5%", "--max-tokens", "4", "--quiet", short)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    long = kvx("generate", "--policy", "snapkv", "--budget", "5%", "--max-tokens", "2",
               "The report was long. " * 200 + "Who wrote it?")
    assert long.returncode == 0 and "note:" not in long.stderr, long.stderr
    full = kvx("generate", "--max-tokens", "2", short)
    assert full.returncode == 0 and "note:" not in full.stderr, full.stderr



def test_a_long_prefill_shows_a_spinner_on_a_terminal_until_the_first_token(default_dir):
    long = "The quick brown fox jumps over the lazy dog. " * 60 + "What does the fox do?"
    code, out, terminal = run_with_terminal_stderr(
        ["generate", "--policy", "snapkv", "--budget", "20%", "--max-tokens", "6", long])
    assert code == 0, terminal
    assert "prefilling " in terminal and " tokens and compressing them (snapkv @ 20%)" in terminal, terminal
    assert "prefilling" not in out and out.strip()  # stdout has the answer alone
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal).replace("\r", "\n")
    assert re.match(r"kvx: \d+ prompt \+ 6 generated", plain.strip().splitlines()[-1])  # spinner gone, summary kept
    code, _, terminal = run_with_terminal_stderr(["generate", "--max-tokens", "2", "Hi"])
    assert code == 0 and "prefilling" not in terminal  # a short prompt: no flicker
    code, _, terminal = run_with_terminal_stderr(["generate", "--quiet", "--max-tokens", "2", long])
    assert code == 0 and terminal == ""



def test_several_questions_stream_each_answer_under_its_question(default_dir, tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("Alice keeps a red umbrella by the door. Bob has a green one.")
    qs = ["What color is Alice's umbrella?", "Who has the green one?"]
    proc = kvx("generate", "--context", str(ctx), "-q", qs[0], "-q", qs[1], "--max-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.split("\n\nQ2: ")
    second = "Q2: " + second
    assert first.startswith(f"Q1: {qs[0]}\n") and len(first.splitlines()) >= 2  # header, then the answer
    assert second.startswith(f"Q2: {qs[1]}\n") and second.endswith("\n") and len(second.splitlines()) >= 2
    as_json = json.loads(kvx("generate", "--context", str(ctx), "-q", qs[0], "-q", qs[1], "--max-tokens", "8",
                             "--json").stdout)
    assert [r["question"] for r in as_json["results"]] == qs
    assert [r["text"] for r in as_json["results"]] == [first.split("\n", 1)[1], second.split("\n", 1)[1].rstrip("\n")]
    one = kvx("generate", "--context", str(ctx), "-q", qs[0], "--max-tokens", "8")
    assert one.stdout == as_json["results"][0]["text"] + "\n"  # one question: the answer alone
    empty = kvx("generate", "--context", str(ctx), "-q", qs[0], "-q", qs[1], "--max-tokens", "0")
    assert empty.stdout == f"Q1: {qs[0]}\n\n\nQ2: {qs[1]}\n\n"  # no answer text: each header still stands


def test_missing_model_path():
    assert_user_error(kvx("generate", "--model", "/no/such/model", "hi"), "/no/such/model")


def test_model_dir_without_weights(tmp_path, default_dir):
    shutil.copy(default_dir / "config.json", tmp_path / "config.json")
    assert_user_error(kvx("generate", "--model", str(tmp_path), "hi"))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert_user_error(kvx("generate", "--model", str(tmp_path), "hi"), "LlamaForCausalLM")


def test_truncated_safetensors(tmp_path, default_dir):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_dir / name, tmp_path / name)
    with open(default_dir / "model.safetensors", "rb") as src:
        (tmp_path / "model.safetensors").write_bytes(src.read(1 << 20))
    assert_user_error(kvx("generate", "--model", str(tmp_path), "hi"))


def test_empty_prompt(default_dir):
    assert_user_error(kvx("generate", "   "), "empty")
    assert_user_error(kvx("generate", stdin=""), "empty")


def test_prompt_longer_than_context(default_dir):
    assert_user_error(kvx("generate", "--raw", stdin="1 " * 9000), "context")


def test_context_file_missing(default_dir):
    assert_user_error(kvx("generate", "--context", "/no/such/file.txt", "-q", "why?"), "not found")

"""Every command x option x bad value, through the installed `kvx` script in a subprocess.

Each must exit 2 with exactly one stderr line `kvx: error: ...` naming what was wrong, no traceback,
nothing on stdout and no file left behind. No model is needed: options are checked before one loads.
The environment proves it: kvx's cache is empty and pip may not download, so a check that came after
model resolution would fail with another message than the one expected here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

def installed_kvx() -> str:
    """The console script pip installed next to this interpreter (else the first on PATH)."""
    script = Path(sys.executable).with_name("kvx")
    found = str(script) if script.is_file() else shutil.which("kvx")
    if found is None:
        pytest.skip("the kvx console script is not installed (pip install -e .)")
    return found


# (id, argv after `kvx`, fragment the single error line must contain, stdin bytes or None).
# FILES names fixtures made once: {bad_utf8} a non-UTF-8 text file, {empty} an empty file, {folder} a folder,
# {a_file} a plain file (a folder path under it cannot exist).
G = ["generate"]
POL = ["--policy", "snapkv", "--budget", "10%"]
EV = ["eval", "--out", "out.jsonl"]
CASES = [
    # generate: sampling
    ("max-tokens-negative", G + ["--max-tokens", "-3", "hi"], "--max-tokens", None),
    ("max-tokens-short-negative", G + ["-n", "-1", "hi"], "--max-tokens", None),
    ("max-tokens-word", G + ["--max-tokens", "abc", "hi"], "--max-tokens", None),
    ("max-tokens-empty", G + ["--max-tokens", "", "hi"], "--max-tokens", None),
    ("max-tokens-missing-value", G + ["hi", "--max-tokens"], "--max-tokens", None),
    ("temperature-negative", G + ["-t", "-1", "hi"], "--temperature", None),
    ("temperature-word", G + ["--temperature", "abc", "hi"], "--temperature", None),
    ("temperature-nan", G + ["--temperature", "nan", "hi"], "--temperature", None),
    ("temperature-inf", G + ["--temperature", "inf", "hi"], "--temperature", None),
    ("top-p-zero", G + ["--top-p", "0", "hi"], "--top-p", None),
    ("top-p-above-one", G + ["--top-p", "1.5", "hi"], "--top-p", None),
    ("top-p-negative", G + ["--top-p", "-0.1", "hi"], "--top-p", None),
    ("top-p-word", G + ["--top-p", "abc", "hi"], "--top-p", None),
    ("top-k-negative", G + ["--top-k", "-1", "hi"], "--top-k", None),
    ("top-k-fraction", G + ["--top-k", "1.5", "hi"], "--top-k", None),
    ("seed-word", G + ["--seed", "abc", "hi"], "--seed", None),
    ("seed-negative", G + ["--seed", "-1", "hi"], "--seed", None),
    ("seed-too-large", G + ["--seed", str(2**64), "hi"], "--seed", None),
    # generate: policy and budget
    ("policy-unknown", G + ["--policy", "nope", "--budget", "5%", "hi"], "--policy", None),
    ("policy-empty", G + ["--policy", "", "--budget", "5%", "hi"], "--policy", None),
    ("policy-without-budget", G + ["--policy", "snapkv", "hi"], "--budget", None),
    ("full-with-budget", G + ["--policy", "full", "--budget", "5%", "hi"], "--budget", None),
    ("budget-word", G + ["--budget", "abc", "hi"], "--budget", None),
    ("budget-empty", G + ["--budget", "", "hi"], "--budget", None),
    ("budget-negative", G + ["--budget", "-5", "hi"], "--budget", None),
    ("budget-zero", G + ["--budget", "0", "hi"], "--budget", None),
    ("budget-zero-percent", G + ["--budget", "0%", "hi"], "--budget", None),
    ("budget-over-100", G + POL[:2] + ["--budget", "150%", "hi"], "--budget", None),
    ("budget-fraction", G + POL[:2] + ["--budget", "1.5", "hi"], "--budget", None),
    ("allocation-unknown", G + POL + ["--allocation", "nope", "hi"], "--allocation", None),
    ("allocation-with-full", G + ["--allocation", "ada", "hi"], "--allocation", None),
    ("policy-arg-no-equals", G + POL + ["--policy-arg", "window", "hi"], "--policy-arg", None),
    ("policy-arg-no-key", G + POL + ["--policy-arg", "=3", "hi"], "--policy-arg", None),
    ("policy-arg-bad-number", G + POL + ["--policy-arg", "window=abc", "hi"], "--policy-arg", None),
    ("policy-arg-unknown", G + POL + ["--policy-arg", "nope=1", "hi"], "--policy-arg", None),
    ("policy-arg-bad-bool", G + ["--policy", "kvzip", "--budget", "10%", "--policy-arg", "keep_prefix=maybe", "hi"],
     "--policy-arg", None),
    ("policy-arg-with-full", G + ["--policy-arg", "window=3", "hi"], "--policy-arg", None),
    ("prefill-chunk-zero", G + POL + ["--prefill-chunk", "0", "hi"], "--prefill-chunk", None),
    ("prefill-chunk-negative", G + POL + ["--prefill-chunk", "-5", "hi"], "--prefill-chunk", None),
    ("prefill-chunk-word", G + POL + ["--prefill-chunk", "abc", "hi"], "--prefill-chunk", None),
    # generate: the batched engine's options
    ("max-batch-zero", G + ["--jsonl", "--max-batch", "0"], "--max-batch", None),
    ("compile-with-jsonl", G + ["--jsonl", "--compile"], "--compile", None),
    ("compile-with-tp", G + ["--compile", "--tp", "2", "hi"], "--compile", None),
    ("prefill-step-zero", G + ["--jsonl", "--prefill-step", "0"], "--prefill-step", None),
    ("prefill-step-word", G + ["--jsonl", "--prefill-step", "lots"], "--prefill-step", None),
    ("max-batch-word", G + ["--jsonl", "--max-batch", "many"], "--max-batch", None),
    ("kv-memory-word", G + ["--jsonl", "--kv-memory", "lots"], "--kv-memory", None),
    ("kv-memory-zero", G + ["--jsonl", "--kv-memory", "0"], "--kv-memory", None),
    ("kv-memory-negative", G + ["--jsonl", "--kv-memory", "-2GiB"], "--kv-memory", None),
    ("max-batch-without-jsonl", G + ["--max-batch", "4", "hi"], "--max-batch only applies to --jsonl", None),
    ("kv-memory-without-jsonl", G + ["--kv-memory", "1GiB", "hi"], "--kv-memory only applies to --jsonl", None),
    ("batch-flags-without-jsonl", G + ["--ordered", "--prefill-first", "--prefill-step", "64", "hi"],
     "--prefill-step, --prefill-first, --ordered only apply to --jsonl", None),
    # generate: device, dtype, model
    ("device-unknown", G + ["--device", "tpu", "hi"], "--device", None),
    ("device-empty", G + ["--device", "", "hi"], "--device", None),
    ("dtype-unknown", G + ["--dtype", "int8", "hi"], "--dtype", None),
    ("model-missing-folder", G + ["--model", "/no/such/model", "hi"], "/no/such/model", None),
    ("model-is-a-file", G + ["--model", "{a_file}", "hi"], "not a folder", None),
    ("model-empty-folder", G + ["--model", "{folder}", "hi"], "config.json", None),
    ("model-hub-id-not-cached", G + ["--model", "no-org/no-model", "hi"], "HF_HUB_OFFLINE", None),
    ("model-hub-revision-not-cached", G + ["--model", "no-org/no-model@v2", "hi"], "not in the Hugging Face cache", None),
    # generate: prompt, context, questions, modes
    ("prompt-empty", G + ["   "], "empty", None),
    ("prompt-empty-stdin", G, "empty", b""),
    ("prompt-not-utf8", G + [b"caf\xe9"], "UTF-8", None),
    ("prompt-stdin-not-utf8", G, "UTF-8", b"caf\xe9 au lait\n"),
    ("system-not-utf8", G + ["--system", b"\xff", "hi"], "--system", None),
    ("context-missing-file", G + ["--context", "/no/such.txt", "-q", "why?"], "not found", None),
    ("context-folder", G + ["--context", "{folder}", "-q", "why?"], "folder", None),
    ("context-empty-file", G + ["--context", "{empty}", "-q", "why?"], "empty", None),
    ("context-not-utf8", G + ["--context", "{bad_utf8}", "-q", "why?"], "UTF-8", None),
    ("context-without-question", G + ["--context", "{empty}"], "--question", None),
    ("context-with-prompt", G + ["--context", "{empty}", "-q", "why?", "hi"], "PROMPT", None),
    ("question-without-context", G + ["-q", "why?", "hi"], "--question", None),
    ("question-empty", G + ["--context", "{empty}", "-q", ""], "--question", None),
    ("jsonl-with-prompt", G + ["--jsonl", "hi"], "--jsonl", None),
    ("jsonl-with-json", G + ["--jsonl", "--json"], "--jsonl", None),
    ("flag-with-value", G + ["--raw=3", "hi"], "--raw", None),
    ("unknown-option", G + ["--nope", "hi"], "--nope", None),
    # other commands
    ("unknown-command", ["nope"], "nope", None),
    ("pull-flag-with-value", ["pull", "--force=yes"], "--force", None),
    ("pull-unknown-option", ["pull", "--nope"], "--nope", None),
    ("policies-flag-with-value", ["policies", "--json=1"], "--json", None),
    ("convert-no-arguments", ["convert"], "gguf_file", None),
    ("convert-missing-file", ["convert", "/no/such.gguf", "out"], "not found", None),
    ("convert-not-gguf", ["convert", "{a_file}", "out"], "not a GGUF file", None),
    ("convert-dtype", ["convert", "{a_file}", "out", "--dtype", "int8"], "--dtype", None),
    ("convert-dtype-auto", ["convert", "{a_file}", "out", "--dtype", "auto"], "--dtype", None),
    ("eval-no-out", ["eval"], "--out", None),
    ("eval-out-missing-folder", ["eval", "--out", "no/such/dir/out.jsonl"], "--out", None),
    ("eval-out-under-a-file", ["eval", "--out", "{a_file}/out.jsonl"], "--out", None),
    ("eval-out-folder", ["eval", "--out", "{folder}"], "--out", None),
    ("eval-task", EV + ["--task", "nope"], "--task", None),
    ("eval-task-empty", EV + ["--task", ","], "--task", None),
    ("eval-context-zero", EV + ["--context", "0"], "--context", None),
    ("eval-context-word", EV + ["--context", "abc"], "--context", None),
    ("eval-policies-unknown", EV + ["--policies", "nope"], "--policies", None),
    ("eval-policies-unclosed", EV + ["--policies", "snapkv[window=3"], "--policies", None),
    ("eval-policies-bad-option", EV + ["--policies", "snapkv[window=abc]"], "--policies", None),
    ("eval-budgets-word", EV + ["--budgets", "5%,abc"], "--budgets", None),
    ("eval-budgets-zero", EV + ["--budgets", "0"], "--budgets", None),
    ("eval-budgets-empty", EV + ["--budgets", ""], "--budgets", None),
    ("eval-samples-zero", EV + ["--samples", "0"], "--samples", None),
    ("eval-samples-word", EV + ["--samples", "abc"], "--samples", None),
    ("eval-max-batch-zero", EV + ["--max-batch", "0"], "--max-batch", None),
    ("eval-mode", EV + ["--mode", "sideways"], "--mode", None),
    ("eval-haystack", EV + ["--haystack", "hay"], "--haystack", None),
    ("eval-max-tokens-zero", EV + ["--max-tokens", "0"], "--max-tokens", None),
    ("eval-seed-word", EV + ["--seed", "abc"], "--seed", None),
    ("eval-depths-zero", EV + ["--depths", "0"], "--depths", None),
    ("eval-against", EV + ["--against", "vllm"], "--against", None),
    ("eval-presses-without-against", EV + ["--presses", "kvzip"], "--presses", None),
    ("eval-presses-unknown", EV + ["--against", "kvpress", "--presses", "kvzip,nope"], "--presses", None),
    ("eval-json-and-markdown", EV + ["--json", "--markdown"], "--json", None),
    ("eval-plot-missing-folder", EV + ["--plot", "no/such/dir/p.png"], "--plot", None),
    ("eval-device", EV + ["--device", "tpu"], "--device", None),
    ("eval-dtype", EV + ["--dtype", "int4"], "--dtype", None),
    ("eval-results-broken-line", ["eval", "--out", "{broken_results}"], "line 2", None),
    ("profile-context-zero", ["profile", "--context", "0"], "--context", None),
    ("profile-context-word", ["profile", "--context", "abc"], "--context", None),
    ("profile-policy", ["profile", "--policy", "nope", "--budget", "5%"], "--policy", None),
    ("profile-budget", ["profile", "--budget", "abc"], "--budget", None),
    ("profile-full-with-budget", ["profile", "--policy", "full", "--budget", "5%"], "--budget", None),
    ("profile-allocation", ["profile", "--budget", "5%", "--allocation", "nope"], "--allocation", None),
    ("profile-policy-arg", ["profile", "--budget", "5%", "--policy-arg", "x"], "--policy-arg", None),
    ("profile-prompt-file-missing", ["profile", "--prompt-file", "/no/such.txt"], "not found", None),
    ("profile-prompt-file-not-utf8", ["profile", "--prompt-file", "{bad_utf8}"], "UTF-8", None),
    ("profile-decode-steps", ["profile", "--decode-steps", "-1"], "--decode-steps", None),
    ("profile-batch", ["profile", "--plan", "--batch", "0"], "--batch", None),
    ("profile-memory", ["profile", "--plan", "--memory", "lots"], "--memory", None),
    ("profile-device", ["profile", "--device", "tpu"], "--device", None),
    ("profile-dtype", ["profile", "--dtype", "fp8"], "--dtype", None),
    ("profile-plot-missing-folder", ["profile", "--plot", "no/such/dir/p.png"], "--plot", None),
    ("bench-suite", ["bench", "--suite", "nope"], "--suite", None),
    ("bench-threads", ["bench", "--threads", "0"], "--threads", None),
    ("bench-repeats", ["bench", "--repeats", "abc"], "--repeats", None),
    ("bench-decode-steps", ["bench", "--decode-steps", "0"], "--decode-steps", None),
    ("bench-prefill-contexts", ["bench", "--prefill-contexts", "1024,abc"], "--prefill-contexts", None),
    ("bench-decode-contexts", ["bench", "--decode-contexts", "0"], "--decode-contexts", None),
    ("bench-policies", ["bench", "--suite", "compression", "--policies", "nope"], "--policies", None),
    ("bench-budgets", ["bench", "--suite", "compression", "--budgets", "abc"], "--budgets", None),
    ("bench-device", ["bench", "--device", "tpu"], "--device", None),
    ("bench-kv-memory", ["bench", "--suite", "batch", "--kv-memory", "lots"], "--kv-memory", None),
    ("bench-batch-requests", ["bench", "--suite", "batch", "--batch-requests", "0"], "--batch-requests", None),
    ("bench-batch-prompt", ["bench", "--suite", "batch", "--batch-prompt", "-1"], "--batch-prompt", None),
    ("bench-batch-gen", ["bench", "--suite", "batch", "--batch-gen", "abc"], "--batch-gen", None),
    ("serve-prefill-step-zero", ["serve", "--prefill-step", "0"], "--prefill-step", None),
    ("serve-prefill-step-word", ["serve", "--prefill-step", "lots"], "--prefill-step", None),
    ("serve-kv-memory-word", ["serve", "--kv-memory", "lots"], "--kv-memory: cannot read memory size", None),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every case once, a few at a time (each is a short-lived process), keyed by case id."""
    files = tmp_path_factory.mktemp("fixtures")
    (files / "bad.txt").write_bytes(b"caf\xe9 \xff\xfe\n")
    (files / "empty.txt").write_text("")
    (files / "folder").mkdir()
    (files / "a_file").write_text("not a model, not a GGUF\n")
    row = ('{"task": "passkey", "context": 1, "haystack": "noise", "seed": 0, "depth": 0.5, "mode": "agnostic", '
           '"policy": "full", "budget": "100%"}')
    (files / "broken.jsonl").write_text(row + '\n{"task": "pass\n')  # line 2 was cut off
    names = {"bad_utf8": files / "bad.txt", "empty": files / "empty.txt", "folder": files / "folder",
             "a_file": files / "a_file", "broken_results": files / "broken.jsonl"}
    home = tmp_path_factory.mktemp("home")
    env = dict(os.environ, KVX_HOME=str(home / "kvx"), HF_HOME=str(home / "hf"), HF_HUB_OFFLINE="1",
               PIP_NO_INDEX="1", PIP_FIND_LINKS="", OMP_NUM_THREADS="1", COLUMNS="200")
    script = installed_kvx()
    snapshot = {p: p.read_bytes() for p in files.iterdir() if p.is_file()}

    def run(case):
        cid, argv, _, stdin = case
        cwd = tmp_path_factory.mktemp(cid)
        args = [a if isinstance(a, bytes) else a.format(**names) for a in argv]
        proc = subprocess.run([script, *args], cwd=cwd, env=env, input=b"" if stdin is None else stdin,
                              capture_output=True, timeout=120)
        return cid, (proc, sorted(os.listdir(cwd)))

    with ThreadPoolExecutor(max_workers=3) as pool:
        out = dict(pool.map(run, CASES))
    out["_fixtures_unchanged"] = all(p.read_bytes() == data for p, data in snapshot.items()) and \
        sorted(p.name for p in files.iterdir()) == sorted(["bad.txt", "empty.txt", "folder", "a_file", "broken.jsonl"])
    out["_home"] = sorted(p.name for p in home.rglob("*"))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_value_is_one_line_exit_2(runs, case):
    cid, _, fragment, _ = case
    proc, left_behind = runs[cid]
    stderr = proc.stderr.decode("utf-8", "replace")
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("kvx: error:"), stderr
    assert fragment in lines[0], stderr
    assert proc.stdout == b""
    assert left_behind == [], f"{cid} left {left_behind}"


def test_no_fixture_or_cache_was_touched(runs):
    assert runs["_fixtures_unchanged"]
    assert runs["_home"] == []


def test_help_and_version_still_exit_0():
    script = installed_kvx()
    for argv in (["--help"], ["generate", "--help"], ["eval", "--help"], ["--version"], []):
        proc = subprocess.run([script, *argv], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (argv, proc.stderr)
        assert proc.stdout.strip() and "Traceback" not in proc.stderr


@pytest.mark.parametrize("value", ["int4", "w8a16", "INT8 x"])
def test_a_bad_cpu_weight_format_is_one_line_exit_2(value, tmp_path):
    """KVX_CPU_WEIGHTS with a format kvx does not have (w8a8, int8, bfloat16, float32 are) fails before the
    model loads: one line naming the variable and the formats, exit 2, no traceback."""
    env = dict(os.environ, KVX_CPU_WEIGHTS=value)
    p = subprocess.run([installed_kvx(), "generate", "--device", "cpu", "--max-tokens", "1", "hi"], env=env,
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert "KVX_CPU_WEIGHTS" in p.stderr and "w8a8" in p.stderr, p.stderr

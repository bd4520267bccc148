"""`kvx eval --summary-only` / `--plot` / `--best` through the installed `kvx` script in a subprocess.

A bad value is one line `kvx: error: ...`, exit 2, no traceback, nothing on stdout and no image or other
file left behind; a good run draws and prints from a results file with no model anywhere (kvx's cache
is empty and the Hugging Face hub offline, so a model load would fail).
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_cli_errors import installed_kvx

ROW = {"task": "passkey", "context": 4096, "haystack": "noise", "depth": 0.5, "mode": "agnostic",
       "model": "tiny", "kv_bytes_full": 100}
ROWS = [dict(ROW, seed=s, policy=p, budget=b, score=v, kv_bytes_held=h)
        for s in (0, 1) for p, b, v, h in [("full", "100%", 1.0, 100), ("snapkv", "5%", float(s), 5),
                                           ("tova", "5%", 0.0, 5), ("kvpress:snapkv", "5%", 0.0, 5)]]

# (id, argv after `kvx eval`, fragment the single error line must contain). {good}: a results file,
# {broken}: one whose second line was cut off, {notjson}: a CSV, {binary}: not text, {empty}: empty.
BAD = [
    ("plot-style-unknown", ["--summary-only", "--out", "{good}", "--plot", "p.png", "--plot-style", "pie"],
     "--plot-style: unknown style 'pie'"),
    ("plot-style-without-plot", ["--summary-only", "--out", "{good}", "--plot-style", "lines"], "--plot-style"),
    ("plot-format-unknown", ["--summary-only", "--out", "{good}", "--plot", "p.xyz"], "--plot"),
    ("results-missing", ["--summary-only", "--out", "missing.jsonl", "--plot", "p.png"], "no such results file"),
    ("results-one-of-several-missing", ["--summary-only", "--out", "{good}", "--out", "missing.jsonl", "--best",
                                        "--plot", "p.png"], "missing.jsonl"),
    ("results-corrupt", ["--summary-only", "--out", "{broken}", "--plot", "p.png"], "line 2"),
    ("results-not-jsonl", ["--summary-only", "--out", "{notjson}", "--best", "--plot", "p.png"], "line 1"),
    ("results-binary", ["--summary-only", "--out", "{binary}", "--plot", "p.png"], "cannot read"),
    ("results-empty", ["--summary-only", "--out", "{empty}", "--plot", "p.png"], "holds no results"),
    ("several-out-in-a-run", ["--out", "a.jsonl", "--out", "b.jsonl"], "--out"),
    ("best-json-and-markdown", ["--summary-only", "--out", "{good}", "--best", "--json", "--markdown"], "choose one"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    return dict(os.environ, KVX_HOME=str(home / "kvx"), HF_HOME=str(home / "hf"), HF_HUB_OFFLINE="1",
                OMP_NUM_THREADS="1", COLUMNS="200")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("results")
    good = folder / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "broken.jsonl").write_text(json.dumps(ROWS[0]) + '\n{"task": "pass\n')
    (folder / "notjson.jsonl").write_text("policy,budget,score\nsnapkv,5%,1\n")  # a CSV by mistake
    (folder / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n not results\n")
    (folder / "empty.jsonl").write_text("")
    return {"good": good, "broken": folder / "broken.jsonl", "notjson": folder / "notjson.jsonl",
            "empty": folder / "empty.jsonl", "binary": folder / "binary.jsonl"}


def run(env, cwd: Path, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([installed_kvx(), "eval", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def bad_runs(env, files, tmp_path_factory):
    def one(case):
        cid, argv, _ = case
        cwd = tmp_path_factory.mktemp(cid)
        proc = run(env, cwd, [a.format(**files) for a in argv])
        return cid, (proc, sorted(os.listdir(cwd)))

    with ThreadPoolExecutor(max_workers=2) as pool:  # short-lived processes, two at a time
        return dict(pool.map(one, BAD))


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_value_is_one_line_exit_2_and_no_file(bad_runs, case):
    cid, _, fragment = case
    proc, left_behind = bad_runs[cid]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("kvx: error:") and fragment in lines[0], proc.stderr
    assert proc.stdout == ""
    assert left_behind == [], f"{cid} left {left_behind}"


def test_draws_and_summarises_without_a_model(env, files, tmp_path):
    before = files["good"].read_bytes()
    proc = run(env, tmp_path, ["--summary-only", "--out", str(files["good"]), "--best", "--markdown",
                               "--plot", "heat.png"])
    assert proc.returncode == 0, proc.stderr
    assert "| passkey, 4k, noise | 1.00 | 5% | snapkv | 0.50 |" in proc.stdout
    assert (tmp_path / "heat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = run(env, tmp_path, ["--summary-only", "--out", str(files["good"]), "--plot", "lines.png",
                               "--plot-style", "lines"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["heat.png", "lines.png"]  # no temporary neighbour left
    assert files["good"].read_bytes() == before  # a summary never rewrites the results


def test_help_teaches_the_new_options(env, tmp_path):
    proc = run(env, tmp_path, ["--help"])
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for needle in ("--plot-style", "heatmap", "lines", "--best", "--summary-only", "best policy per budget"):
        assert needle in text, needle

"""`kvx compress` and `kvx generate --load-context` through the installed script, on the default model:
answers from the file equal answers from compressing in the same run, and every bad file or option is one
line and exit 2, with no output file left behind."""

from __future__ import annotations

import json
import subprocess

import pytest
from test_cli_errors import installed_kvx
from test_contexts import _tamper

pytestmark = pytest.mark.slow

QUESTIONS = ["What does the text define?", "Name one keyword it mentions."]


def _run(*argv, cwd=None, timeout=600):
    p = subprocess.run([installed_kvx(), *map(str, argv)], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    folder = tmp_path_factory.mktemp("contexts")
    text = open(__import__("pydoc_data.topics", fromlist=["topics"]).__file__).read()[30000:33000]
    ctx = folder / "doc.txt"
    ctx.write_text(text)
    out = folder / "doc.kvc"
    code, stdout, err = _run("compress", "--context", ctx, "--budget", "20%", "-o", out, "--json", "--dtype", "float32")
    assert code == 0, err
    return folder, ctx, out, json.loads(stdout)


def test_compress_reports_the_file_against_a_full_cache(made):
    _, _, out, summary = made
    assert out.is_file() and summary["file_bytes"] == out.stat().st_size
    assert summary["policy"] == "kvzip" and summary["budget"] == "20%"
    assert summary["entries_kept"] <= 0.21 * summary["entries_full"]
    # The file holds the kept bytes (plus positions), not the full cache.
    assert summary["kv_bytes_kept"] <= out.stat().st_size < 0.3 * summary["kv_bytes_full"]


def test_answers_from_the_file_equal_compressing_in_the_same_run(made):
    _, ctx, out, _ = made
    qs = [a for q in QUESTIONS for a in ("-q", q)]
    code, stdout, err = _run("generate", "--load-context", out, *qs, "-n", "24", "--json")
    assert code == 0, err
    loaded = json.loads(stdout)
    code, stdout, err = _run("generate", "--context", ctx, *qs, "-n", "24", "--json", "--policy", "kvzip",
                             "--budget", "20%", "--dtype", "float32")
    assert code == 0, err
    fresh = json.loads(stdout)
    assert [r["text"] for r in loaded["results"]] == [r["text"] for r in fresh["results"]]
    assert [r["generated_tokens"] for r in loaded["results"]] == [r["generated_tokens"] for r in fresh["results"]]
    assert all(r["text"].strip() for r in loaded["results"])
    assert loaded["cached_tokens"] > 500


def test_bad_files_and_options_are_one_line_exit_2(made, tmp_path):
    from checkpoints import make_checkpoint

    folder, ctx, out, _ = made
    data = out.read_bytes()
    (tmp_path / "short.kvc").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.kvc").write_text("not a context\n")
    _tamper(out, tmp_path / "lengths.kvc", lambda t, m: t.update(lengths=t["lengths"] * 50))
    _tamper(out, tmp_path / "pos.kvc", lambda t, m: t.update({"pos.3": t["pos.3"] + 10**6}))
    other, _ = make_checkpoint("llama_gqa_llama3", tmp_path)  # another model with the same tokenizer
    from kvx.models.hub import pull_default_model

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes((pull_default_model(quiet=True) / name).read_bytes())
    q = ["-q", "Why?"]
    cases = [
        (["generate", "--load-context", tmp_path / "missing.kvc", *q], "not found"),
        (["generate", "--load-context", tmp_path / "text.kvc", *q], "not a readable context file"),
        (["generate", "--load-context", tmp_path / "short.kvc", *q], "context file"),
        (["generate", "--load-context", tmp_path / "lengths.kvc", *q], "tampered"),
        (["generate", "--load-context", tmp_path / "pos.kvc", *q], "positions outside"),
        (["generate", "--load-context", out, "--dtype", "bfloat16", *q], "--dtype float32"),
        (["generate", "--load-context", out, "--model", other, *q], "another model"),
        (["generate", "--load-context", out, "--budget", "5%", *q], "drop --budget"),
        (["generate", "--load-context", out], "at least one --question"),
        (["compress", "--context", ctx, "-o", tmp_path / "x.kvc", "--policy", "full"], "nothing to compress"),
        (["compress", "--context", ctx, "-o", tmp_path / "x.kvc", "--budget", "0%"], "--budget"),
        (["compress", "--context", tmp_path / "nope.txt", "-o", tmp_path / "x.kvc"], "nope.txt"),
        (["compress", "--context", ctx, "-o", tmp_path], "is a folder"),
        (["compress", "--context", ctx, "-o", tmp_path / "no" / "x.kvc"], "does not exist"),
    ]
    for argv, fragment in cases:
        code, stdout, err = _run(*argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("kvx: error:"), (argv, err)
        assert fragment in lines[0], (argv, lines[0])
        assert "Traceback" not in err
    assert not (tmp_path / "x.kvc").exists()
    assert not list(tmp_path.glob(".*.part"))


def test_jsonl_lines_on_a_context_file_share_it_and_answer_as_load_context(made):
    _, _, out, _ = made
    lines = [{"id": i, "context_file": str(out), "question": q, "max_tokens": 16} for i, q in enumerate(QUESTIONS)]
    lines.append({"id": "bad", "context_file": str(out), "question": "Why?", "budget": "5%"})
    stdin = "".join(json.dumps(x) + "\n" for x in lines)
    p = subprocess.run([installed_kvx(), "generate", "--jsonl", "--dtype", "float32", "--ordered"], input=stdin,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 1  # one line failed, the others ran
    rows = [json.loads(x) for x in p.stdout.splitlines()]
    assert "drop 'budget'" in rows[-1]["error"]
    qs = [a for q in QUESTIONS for a in ("-q", q)]
    code, stdout, err = _run("generate", "--load-context", out, *qs, "-n", "16", "--json")
    assert code == 0, err
    want = [r["text"] for r in json.loads(stdout)["results"]]
    assert [r["results"][0]["text"] for r in rows[:-1]] == want
    assert all(r["results"][0]["cached_tokens"] > 500 for r in rows[:-1])

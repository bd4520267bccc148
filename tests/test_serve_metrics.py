"""/metrics read by prometheus_client's own parser: vLLM's names with the kvx: prefix, the right types,
and counters and histogram counts that match the requests sent; each server has its own registry."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvx.serve.metrics import parse
from serve_helpers import live_server, tiny_model_dir, torch_threads, words

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MAX_TOKENS = 5

TYPES = {
    "kvx:num_requests_running": "gauge", "kvx:num_requests_waiting": "gauge", "kvx:kv_cache_usage_perc": "gauge",
    "kvx:kv_cache_bytes_held": "gauge", "kvx:kv_cache_bytes_full": "gauge", "kvx:kv_cache_bytes_total": "gauge",
    "kvx:kv_blocks_used": "gauge", "kvx:kv_blocks_reserved": "gauge", "kvx:tokens_per_second": "gauge",
    "kvx:prompt_tokens": "counter", "kvx:generation_tokens": "counter", "kvx:request_success": "counter",
    "kvx:request_errors": "counter", "kvx:queue_rejections": "counter",
    "kvx:time_to_first_token_seconds": "histogram", "kvx:inter_token_latency_seconds": "histogram",
    "kvx:request_time_per_output_token_seconds": "histogram", "kvx:e2e_request_latency_seconds": "histogram",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def scrape(url: str) -> tuple[dict[str, str], dict[str, float]]:
    text = httpx.get(url + "/metrics", timeout=10).text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    return families, parse(text)


def _requests() -> list[tuple[str, dict]]:
    out = []
    for i in range(6):
        body = {"max_tokens": MAX_TOKENS, "temperature": 0, "stream": i % 2 == 1}
        if i % 3 == 0:
            out.append((COMPLETIONS, {**body, "prompt": words(10 + i, seed=i)}))
        else:
            out.append((CHAT, {**body, "messages": [{"role": "user", "content": words(10 + i, seed=i)}],
                               "stream_options": {"include_usage": True} if body["stream"] else None}))
    return out


def _send(url: str, path: str, body: dict) -> dict:
    """The request's usage (streamed or not)."""
    if not body["stream"]:
        r = httpx.post(url + path, json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"]
    body = {**body, "stream_options": {"include_usage": True}}
    import json

    with httpx.stream("POST", url + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    return events[-1]["usage"]


def test_metrics_parse_and_count_the_requests_sent(model_dir):
    with torch_threads(1), live_server(str(model_dir), max_batch=4) as srv:
        families, before = scrape(srv.url)
        for name, kind in TYPES.items():
            assert families.get(name) == kind, (name, families.get(name))
        assert before["kvx:generation_tokens_total"] == 0 and before["kvx:prompt_tokens_total"] == 0
        usages = [_send(srv.url, path, body) for path, body in _requests()]
        bad = [httpx.post(srv.url + CHAT, json={"messages": []}, timeout=10),
               httpx.post(srv.url + COMPLETIONS, content=b"{oops", timeout=10),
               httpx.post(srv.url + COMPLETIONS, json={"prompt": "w7", "max_tokens": 0}, timeout=10)]
        assert [r.status_code for r in bad] == [400, 400, 400]
        assert httpx.get(srv.url + "/v1/nowhere", timeout=10).status_code == 404
        n = len(usages)
        m = srv.wait_metrics(lambda m: m["kvx:kv_blocks_used"] == 0 and m["kvx:num_requests_running"] == 0)
    assert m["kvx:prompt_tokens_total"] == sum(u["prompt_tokens"] for u in usages)
    assert m["kvx:generation_tokens_total"] == sum(u["completion_tokens"] for u in usages) == n * MAX_TOKENS
    assert m['kvx:request_success_total{finished_reason="length"}'] == n  # the tiny model has no EOS
    assert m['kvx:request_success_total{finished_reason="stop"}'] == 0
    assert m['kvx:request_success_total{finished_reason="abort"}'] == 0
    assert m['kvx:request_errors_total{kind="invalid_request"}'] == 3
    assert m['kvx:request_errors_total{kind="not_found"}'] == 1
    assert m["kvx:queue_rejections_total"] == 0
    assert m["kvx:time_to_first_token_seconds_count"] == n and m["kvx:e2e_request_latency_seconds_count"] == n
    assert m["kvx:inter_token_latency_seconds_count"] == n * (MAX_TOKENS - 1)
    assert m["kvx:request_time_per_output_token_seconds_count"] == n
    assert 0 < m["kvx:time_to_first_token_seconds_sum"] < m["kvx:e2e_request_latency_seconds_sum"]
    assert m['kvx:e2e_request_latency_seconds_bucket{le="+Inf"}'] == n
    assert m["kvx:kv_cache_usage_perc"] == 0 and m["kvx:kv_cache_bytes_held"] == 0
    assert m["kvx:kv_cache_bytes_total"] > 0 and m["kvx:num_requests_waiting"] == 0


def test_a_compressed_request_holds_less_than_its_full_cache_and_servers_count_apart(model_dir):
    import json

    with torch_threads(1), live_server(str(model_dir), max_batch=2) as a, live_server(str(model_dir)) as b:
        body = {"messages": [{"role": "user", "content": words(300, seed=3)}], "max_tokens": 3000,
                "temperature": 0, "stream": True, "kv_policy": "tova", "kv_budget": "10%"}
        with httpx.stream("POST", a.url + CHAT, json=body, timeout=60) as r:
            lines = r.iter_lines()
            got = 0
            for line in lines:
                got += line.startswith("data: {") and bool(json.loads(line[6:])["choices"][0]["delta"].get("content"))
                if got == 3:
                    break
            during = a.wait_metrics(lambda m: m["kvx:num_requests_running"] == 1 and m["kvx:kv_cache_bytes_held"] > 0)
        assert 0 < during["kvx:kv_cache_bytes_held"] < 0.5 * during["kvx:kv_cache_bytes_full"]
        assert 0 < during["kvx:kv_cache_usage_perc"] < 1
        after = a.wait_metrics(lambda m: m['kvx:request_success_total{finished_reason="abort"}'] == 1)
        assert after["kvx:kv_blocks_used"] == 0 and after["kvx:kv_cache_bytes_full"] == 0
        other = b.metrics()  # its own registry: nothing of a's requests
        assert other["kvx:generation_tokens_total"] == 0 and other["kvx:prompt_tokens_total"] == 0
        assert other['kvx:request_success_total{finished_reason="abort"}'] == 0

"""Load benchmark for `kvx serve`: N concurrent streaming clients with long prompts, the full cache
against a compressed one on the same server (so in the same --kv-memory), reported as `vllm bench serve`
reports a run.

Start the server, then run the clients against it:

    kvx serve --kv-memory 100MiB --max-batch 16 --threads 2 --max-queue 1024 &
    python3 benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 8 --prompt-tokens 1024 \
        --max-tokens 32 --policy snapkv --budget 5%

Each phase (full, then policy @ budget) sends clients x requests-per-client chat requests, each with its
own prose prompt (CPython's pydoc_data, `kvx.eval.haystack.filler_ids`) and a question, greedy, streamed,
with ignore_eos so that every request generates exactly --max-tokens tokens.
Reported per phase, with vLLM's definitions: request throughput (completed requests / the phase's wall
time), output and total (prompt + output) token throughput, failures; TTFT (send to first token), TPOT
(a request's (latency - TTFT) / (output tokens - 1)), ITL (every gap between two streamed chunks) and E2EL
(send to last byte), each at mean / p50 / p90 / p99; and the most requests /metrics saw running at once.
The client only parses SSE lines, so it stays light next to the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvx.eval.haystack import filler_ids  # noqa: E402
from kvx.models.hub import resolve_model  # noqa: E402
from kvx.models.tokenizer import Tokenizer  # noqa: E402
from kvx.serve.metrics import parse as parse_metrics  # noqa: E402

QUESTION = "\n\nIn two sentences, what is the text above about?"


@dataclass
class Sample:
    sent: float
    stamps: list[float] = field(default_factory=list)  # arrival of each content chunk
    usage: dict | None = None
    ended: float = 0.0
    error: str | None = None  # the failure, if the request failed


def prompts(model: str | None, count: int, n_tokens: int) -> list[str]:
    """`count` different prose passages of n_tokens tokens each, plus the question."""
    tok = Tokenizer.from_dir(resolve_model(model, quiet=True))
    ids = filler_ids(tok, n_tokens * (count + 1), first=False)
    step = max(1, (len(ids) - n_tokens) // max(1, count))
    return [tok.decode(ids[i * step:i * step + n_tokens]) + QUESTION for i in range(count)]


async def one(client: httpx.AsyncClient, url: str, prompt: str, fields: dict, max_tokens: int,
              headers: dict) -> Sample:
    # ignore_eos: every request generates max_tokens tokens, so both caches do the same work.
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, **fields}
    s = Sample(time.perf_counter())
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}"
                return s
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    s.error = obj["error"]["message"]
                if obj.get("usage"):
                    s.usage = obj["usage"]
                if obj.get("choices") and obj["choices"][0]["delta"].get("content"):
                    s.stamps.append(time.perf_counter())
    except httpx.HTTPError as exc:
        s.error = f"{type(exc).__name__}: {exc}"
    s.ended = time.perf_counter()
    if s.error is None and (s.usage is None or not s.stamps):
        s.error = "the stream ended without its answer"
    return s


async def watch(client: httpx.AsyncClient, url: str, peak: dict, stop: asyncio.Event, headers: dict) -> None:
    while not stop.is_set():
        m = parse_metrics((await client.get(url + "/metrics", headers=headers)).text)
        peak["running"] = max(peak.get("running", 0), m["kvx:num_requests_running"])
        peak["blocks"] = max(peak.get("blocks", 0), m["kvx:kv_blocks_used"])
        peak["blocks_total"] = m["kvx:kv_blocks_total"]
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except asyncio.TimeoutError:
            pass


def stats(values: list[float], scale: float = 1.0) -> dict:
    """mean / p50 / p90 / p99 of `values` times `scale` (None when there are none)."""
    if not values:
        return {k: None for k in ("mean", "p50", "p90", "p99")}
    a = np.asarray(values) * scale
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def summary(samples: list[Sample], wall: float) -> dict:
    ok = [s for s in samples if s.error is None]
    ttft = [s.stamps[0] - s.sent for s in ok]
    tpot = [(s.ended - s.stamps[0]) / (s.usage["completion_tokens"] - 1) for s in ok
            if s.usage["completion_tokens"] > 1]
    itl = [b - a for s in ok for a, b in zip(s.stamps, s.stamps[1:])]
    e2el = [s.ended - s.sent for s in ok]
    out_tokens = sum(s.usage["completion_tokens"] for s in ok)
    in_tokens = sum(s.usage["prompt_tokens"] for s in ok)
    return {
        "requests": len(samples), "completed": len(ok), "failed": len(samples) - len(ok),
        "errors": sorted({s.error for s in samples if s.error})[:5], "wall_s": wall,
        "request_throughput": len(ok) / wall, "output_token_throughput": out_tokens / wall,
        "total_token_throughput": (in_tokens + out_tokens) / wall, "output_tokens": out_tokens,
        "prompt_tokens_mean": in_tokens / len(ok) if ok else None,
        "ttft_ms": stats(ttft, 1e3), "tpot_ms": stats(tpot, 1e3), "itl_ms": stats(itl, 1e3),
        "e2el_ms": stats(e2el, 1e3),
        "kv_bytes_held_mean": float(np.mean([s.usage["kv_bytes_held"] for s in ok])) if ok else None,
    }


async def phase(url: str, texts: list[str], clients: int, fields: dict, max_tokens: int, headers: dict) -> dict:
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        queue = list(enumerate(texts))
        samples: list[Sample] = []

        async def worker() -> None:
            while queue:
                _, text = queue.pop(0)
                samples.append(await one(client, url, text, fields, max_tokens, headers))

        peak, stop = {}, asyncio.Event()
        watcher = asyncio.create_task(watch(client, url, peak, stop, headers))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
        stop.set()
        await watcher
    return {**summary(samples, wall), "peak_running": peak.get("running"), "peak_blocks_used": peak.get("blocks"),
            "blocks_total": peak.get("blocks_total")}


def _ms(d: dict) -> str:
    return " / ".join("–" if d[k] is None else f"{d[k]:.0f}" for k in ("p50", "p90", "p99"))


def report(runs: dict) -> str:
    lines = ["| cache | completed / failed | requests/s | output tokens/s | total tokens/s | peak running | "
             "KV held per request |", "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        held = "–" if r["kv_bytes_held_mean"] is None else f"{r['kv_bytes_held_mean'] / 2**20:.1f} MiB"
        lines.append(f"| {name} | {r['completed']} / {r['failed']} | {r['request_throughput']:.3f} | "
                     f"{r['output_token_throughput']:.2f} | {r['total_token_throughput']:.1f} | "
                     f"{r['peak_running'] or 0:.0f} | {held} |")
    lines += ["", "| cache | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) | ITL p50 / p90 / p99 (ms) | "
              "E2EL p50 / p90 / p99 (ms) |", "|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {_ms(r['ttft_ms'])} | {_ms(r['tpot_ms'])} | {_ms(r['itl_ms'])} | "
                     f"{_ms(r['e2el_ms'])} |")
    full = runs.get("full")
    for name, small in runs.items():
        if full and name != "full" and full["output_token_throughput"] and small["ttft_ms"]["p99"] is not None:
            lines.append(f"\n{name}: output tokens/s ratio "
                         f"{small['output_token_throughput'] / full['output_token_throughput']:.2f}x; p99 TTFT "
                         f"{small['ttft_ms']['p99'] / 1e3:.2f} s vs {full['ttft_ms']['p99'] / 1e3:.2f} s (full)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="a running `kvx serve`")
    ap.add_argument("--model", default=None, help="the server's model folder, for its tokenizer (default model)")
    ap.add_argument("--api-key", default=None, help="the server's API key, if it needs one")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests-per-client", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--policy", default="snapkv",
                    help="the compressed phase's policy; several, comma-separated, run one phase each after the full one")
    ap.add_argument("--budget", default="5%")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()

    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    texts = prompts(a.model, a.clients * a.requests_per_client, a.prompt_tokens)
    warm = httpx.post(a.url + "/v1/chat/completions", timeout=600, headers=headers, json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0})
    warm.raise_for_status()
    runs = {}
    phases = [("full", {"kv_policy": "full"})] + [
        (f"{p} @ {a.budget}", {"kv_policy": p, "kv_budget": a.budget}) for p in a.policy.split(",") if p]
    for name, fields in phases:
        runs[name] = asyncio.run(phase(a.url, texts, a.clients, fields, a.max_tokens, headers))
        print(f"{name}: {json.dumps(runs[name])}", file=sys.stderr, flush=True)
    print(report(runs))
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()

"""Load benchmark for `kvx serve`: N concurrent streaming clients with long prompts, the full cache
against a compressed one on the same server (so in the same --kv-memory).

Start the server, then run the clients against it:

    kvx serve --kv-memory 100MiB --max-batch 16 --threads 2 --max-queue 1024 &
    python3 benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 8 --prompt-tokens 1024 \
        --max-tokens 32 --policy snapkv --budget 5%

Each phase (full, then policy @ budget) sends clients x requests-per-client chat requests, each with its
own prose prompt (CPython's pydoc_data, `kvx.eval.haystack.filler_ids`) and a question, greedy, streamed,
with ignore_eos so that every request generates exactly --max-tokens tokens.
Reported per phase: requests/s, output tokens/s (all output tokens / the phase's wall time), time to first
token and inter-token latency (p50 / p99, over every request), and the most requests /metrics saw running
at once. The client only parses SSE lines, so it stays light next to the server.
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


def prompts(model: str | None, count: int, n_tokens: int) -> list[str]:
    """`count` different prose passages of n_tokens tokens each, plus the question."""
    tok = Tokenizer.from_dir(resolve_model(model, quiet=True))
    ids = filler_ids(tok, n_tokens * (count + 1), first=False)
    step = max(1, (len(ids) - n_tokens) // max(1, count))
    return [tok.decode(ids[i * step:i * step + n_tokens]) + QUESTION for i in range(count)]


async def one(client: httpx.AsyncClient, url: str, prompt: str, fields: dict, max_tokens: int) -> Sample:
    # ignore_eos: every request generates max_tokens tokens, so both caches do the same work.
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, **fields}
    s = Sample(time.perf_counter())
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                s.usage = obj["usage"]
            if obj["choices"] and obj["choices"][0]["delta"].get("content"):
                s.stamps.append(time.perf_counter())
    return s


async def watch(client: httpx.AsyncClient, url: str, peak: dict, stop: asyncio.Event) -> None:
    while not stop.is_set():
        m = parse_metrics((await client.get(url + "/metrics")).text)
        peak["running"] = max(peak.get("running", 0), m["kvx:num_requests_running"])
        peak["blocks"] = max(peak.get("blocks", 0), m["kvx:kv_blocks_used"])
        peak["blocks_total"] = m["kvx:kv_blocks_total"]
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except asyncio.TimeoutError:
            pass


async def phase(url: str, texts: list[str], clients: int, fields: dict, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        queue = list(enumerate(texts))
        samples: list[Sample] = []

        async def worker() -> None:
            while queue:
                _, text = queue.pop(0)
                samples.append(await one(client, url, text, fields, max_tokens))

        peak, stop = {}, asyncio.Event()
        watcher = asyncio.create_task(watch(client, url, peak, stop))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
        stop.set()
        await watcher
    ttft = [s.stamps[0] - s.sent for s in samples if s.stamps]
    itl = [b - a for s in samples for a, b in zip(s.stamps, s.stamps[1:])]
    out_tokens = sum(s.usage["completion_tokens"] for s in samples)
    return {
        "requests": len(samples), "wall_s": wall, "requests_per_s": len(samples) / wall,
        "output_tokens_per_s": out_tokens / wall, "output_tokens": out_tokens,
        "prompt_tokens_mean": float(np.mean([s.usage["prompt_tokens"] for s in samples])),
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
        "itl_p50_s": float(np.percentile(itl, 50)) if itl else None,
        "itl_p99_s": float(np.percentile(itl, 99)) if itl else None,
        "kv_bytes_held_mean": float(np.mean([s.usage["kv_bytes_held"] for s in samples])),
        "peak_running": peak.get("running"), "peak_blocks_used": peak.get("blocks"),
        "blocks_total": peak.get("blocks_total"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="a running `kvx serve`")
    ap.add_argument("--model", default=None, help="the server's model folder, for its tokenizer (default model)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests-per-client", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--policy", default="snapkv",
                    help="the compressed phase's policy; several, comma-separated, run one phase each after the full one")
    ap.add_argument("--budget", default="5%")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()

    texts = prompts(a.model, a.clients * a.requests_per_client, a.prompt_tokens)
    warm = httpx.post(a.url + "/v1/chat/completions", timeout=600, json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0})
    warm.raise_for_status()
    runs = {}
    phases = [("full", {"kv_policy": "full"})] + [
        (f"{p} @ {a.budget}", {"kv_policy": p, "kv_budget": a.budget}) for p in a.policy.split(",") if p]
    for name, fields in phases:
        runs[name] = asyncio.run(phase(a.url, texts, a.clients, fields, a.max_tokens))
        print(f"{name}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in runs[name].items()})}",
              file=sys.stderr, flush=True)

    print("| cache | requests/s | output tokens/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | peak running | "
          "KV held per request |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['requests_per_s']:.3f} | {r['output_tokens_per_s']:.2f} | "
              f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | {1e3 * r['itl_p50_s']:.0f} / {1e3 * r['itl_p99_s']:.0f} | "
              f"{r['peak_running']:.0f} | {r['kv_bytes_held_mean'] / 2**20:.1f} MiB |")
    full = runs["full"]
    for name, small in runs.items():
        if name != "full":
            print(f"\n{name}: output tokens/s ratio {small['output_tokens_per_s'] / full['output_tokens_per_s']:.2f}x; "
                  f"p99 TTFT {small['ttft_p99_s']:.2f} s vs {full['ttft_p99_s']:.2f} s (full)")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()

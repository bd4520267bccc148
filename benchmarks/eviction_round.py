"""One decode-time eviction round of a whole batch: batched (batch_eviction.evict_due, the engine's entry
point: every due segment of every sequence ranked in one pass) vs per request (decode_eviction's
evict_per_segment, a few tensor ops per (sequence, layer, kv head) segment).

S requests of a real model's layer / kv-head / head-dim shapes (default Llama-3.1-8B: 32 x 8, d 128,
group 4), every segment at target + DECODE_SLACK entries (all due, as when a batch compressed in the same
step evicts together), random keys, values, positions and attention mass. Each path runs on its own copy
of the same caches; the figure is the wall time of one round (device synchronised), and the round recurs
every DECODE_SLACK steps per sequence. A lone request (`kvx generate`) is a batch of one: --seqs 1.

Run from the repository root:
  python3 benchmarks/eviction_round.py --device cuda                  # 21 x 32 x 8 segments of 1654 entries
  python3 benchmarks/eviction_round.py --device cuda --seqs 1         # one sequence, 32 x 8 segments
  python3 benchmarks/eviction_round.py --device cpu --target 100      # a CPU-sized run
  python3 benchmarks/eviction_round.py --device cpu --seqs 2 --layers 2 --kv-heads 2 --target 40  # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvx.policies import build_policy, parse_budget  # noqa: E402
from kvx.runtime.compression.batch_eviction import evict_due  # noqa: E402
from kvx.runtime.compression.decode_eviction import DECODE_SLACK, evict_per_segment  # noqa: E402
from kvx.runtime.cache.paged_cache import PagedKVCache  # noqa: E402
from kvx.runtime.cache.pool import BlockPool  # noqa: E402
from kvx.runtime.engine.state import SequenceState  # noqa: E402


def requests(pool, args, policy_name, gen) -> list[SequenceState]:
    out = []
    n = args.target + DECODE_SLACK
    H = args.kv_heads * args.group
    for _ in range(args.seqs):
        policy = build_policy(policy_name)
        cache = PagedKVCache(pool, args.layers, args.kv_heads, capacity=n,
                             track_mass=policy.decode_mode in ("accumulate", "last"))
        for layer in range(args.layers):
            lc = cache.layers[layer]
            lc.lengths = [n] * args.kv_heads
            slots = torch.cat([lc.slots(g) for g in range(args.kv_heads)])
            shape, dev = (slots.numel(), args.head_dim), pool.device  # random data made where the pool is
            pool.k_flat[slots] = torch.randn(shape, generator=gen, device=dev).to(pool.dtype)
            pool.v_flat[slots] = torch.randn(shape, generator=gen, device=dev).to(pool.dtype)
            pool.pos_flat[slots] = torch.arange(n, device=dev).repeat(args.kv_heads)
            pool.mass_flat[slots] = torch.rand(slots.numel(), generator=gen, device=dev)
        recent_q = [None] * args.layers
        if policy.decode_mode == "recent_queries":
            recent_q = torch.randn(args.layers, H, policy.window, args.head_dim, generator=gen,
                                   device=pool.device).to(pool.dtype)
        out.append(SequenceState(cache=cache, policy=policy, budget=parse_budget("5%"), position=n,
                           head_budget=[[args.target] * args.kv_heads for _ in range(args.layers)], recent_q=recent_q))
    return out


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seqs", type=int, default=21)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--target", type=int, default=1638, help="entries kept per segment (5%% of 32k by default)")
    ap.add_argument("--policies", default="tova,h2o,streaming,ahakv")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(1) if device.type == "cpu" else None
    segments = args.seqs * args.layers * args.kv_heads
    blocks_per = -(-(args.target + DECODE_SLACK) // 32)
    pool = BlockPool(2 * segments * blocks_per + 64, 32, args.head_dim, dtype, device)
    engine = SimpleNamespace(group=args.group, device=device, config=SimpleNamespace(head_dim=args.head_dim),
                             scale=args.head_dim ** -0.5)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name in [p.strip() for p in args.policies.split(",") if p.strip()]:
        times = {}
        for path in ("warm-up", "batched", "per request"):
            reqs = requests(pool, args, name, gen)
            if path == "per request":
                times[path] = timed(lambda: [evict_per_segment(engine, r) for r in reqs], device)
            else:
                times[path] = timed(lambda: evict_due(engine, reqs), device)
            assert all(n == args.target for r in reqs for lc in r.cache.layers for n in lc.lengths)
            for r in reqs:
                r.cache.release()
        row = {"policy": name, "device": str(device), "segments": segments, "entries_per_segment": args.target + DECODE_SLACK,
               "batched_ms": times["batched"] * 1e3, "per_request_ms": times["per request"] * 1e3,
               "speedup": times["per request"] / times["batched"],
               "batched_ms_per_step": times["batched"] * 1e3 / DECODE_SLACK}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

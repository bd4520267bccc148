"""GPU benchmark: continuous batching on Llama-3.1-8B shapes (random bf16 weights), full vs a 5% budget
in the same KV memory.

Each configuration gets as many requests of P random tokens (G generated tokens each) as its pool holds at
once (the scheduler's admission arithmetic, memory.pool_capacity; --requests caps it): (b) full cache;
(c) SnapKV at 5%, the freed memory spent on more sequences (`--policies snapkv,tova` adds a row per policy:
TOVA and H2O also evict while decoding, batch_eviction.py). The engine runs prefill-first (no decode step
while a prompt is still being prefilled), so the batch is full when it decodes: decode tokens/s is then the
throughput of the batch the memory holds, which is what the comparison is about. Reports decode tokens/s
(generated tokens over the time in decode steps, less the one-off CUDA-graph captures, reported apart as
capture_s), end-to-end tokens/s, the most sequences decoding at once, the
pool's peak use, and (c)/(b). The goal (issue "many requests at once"): (c) >= 8x (b) in decode throughput
at 32k-token prompts.

With the pool full in both configurations, a bandwidth-bound step reads the weights plus the whole pool
either way, so (c)/(b) is about the ratio of sequences held, whatever the pool's size; a small pool keeps
the prefills (most of the run) short. The default, 8.5 GiB, holds 2 full 32k sequences and 21 at 5%.

Run from the repository root:  python3 benchmarks/gpu_batch.py --out batch.json
Smoke-run on a CPU with tiny shapes:  python3 benchmarks/gpu_batch.py --tiny --device cpu --prompt 600 --gen 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_decode import NullTokenizer, llama_config, random_state, tiny_config  # noqa: E402
from kvx.models.transformer import Transformer  # noqa: E402
from kvx.policies import build_policy, parse_budget  # noqa: E402
from kvx.runtime.engine.batch_engine import BatchEngine  # noqa: E402
from kvx.runtime.engine.model_runner import ModelRunner  # noqa: E402
from kvx.runtime.memory import pool_capacity  # noqa: E402
from kvx.runtime.engine.sequence import GenerationRequest  # noqa: E402


def run(engine, prompts, gen, kv_memory, policy, budget, max_batch):
    batch = BatchEngine(engine, kv_memory, max_batch, prefill_first=True)
    t0 = time.perf_counter()
    seqs = [batch.submit(GenerationRequest(prompt_ids=p, max_tokens=gen, stop_at_eos=False,
                                           policy=build_policy(policy) if policy else None,
                                           budget=parse_budget(budget) if budget else None)) for p in prompts]
    peak = 0
    while batch.has_work:
        batch.step()
        peak = max(peak, batch.pool.num_used)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    generated = sum(r.generated_tokens for s in seqs for r in s.results)
    decode_s = batch.decode_s - batch.stepper.capture_s  # a new shape's capture is once, not per step
    return {"policy": policy or "full", "budget": budget, "requests": len(prompts), "prompt_tokens": len(prompts[0]),
            "generated_tokens": generated, "decode_s": decode_s, "capture_s": batch.stepper.capture_s,
            "prefill_s": batch.prefill_s, "decode_tokens_per_s": generated / decode_s,
            "end_to_end_tokens_per_s": generated / wall,
            "max_running": batch.max_running, "decode_steps": batch.decode_steps, "wall_s": wall,
            "kv_memory": kv_memory, "pool_blocks": batch.pool.num_blocks, "peak_blocks_used": peak,
            "cuda_graphs": batch.stepper.use_graphs, "graph_captures": batch.stepper.captures}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_batch.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke run of the script's logic)")
    ap.add_argument("--requests", type=int, default=64, help="at most this many requests per configuration")
    ap.add_argument("--prompt", type=int, default=32768)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--kv-memory-gib", type=float, default=8.5)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--no-graph", action="store_true", help="decode eagerly (no CUDA graphs) in every row")
    ap.add_argument("--policies", default="snapkv",
                    help="comma-separated policies at 5%%, one (c) row each (tova, h2o: decode-time eviction too)")
    args = ap.parse_args()
    if args.tiny:
        cfg = tiny_config()
        dtype = torch.float32
    else:
        cfg = llama_config()
        dtype = torch.bfloat16
    model = Transformer(cfg, random_state(cfg, args.device, dtype))
    engine = ModelRunner(model, NullTokenizer(), use_graphs=not args.no_graph)
    g = torch.Generator().manual_seed(0)
    memory = int(args.kv_memory_gib * (1 << 30))
    nbytes = torch.empty((), dtype=dtype).element_size()
    fit_full, fit_compressed = pool_capacity(cfg, args.prompt, parse_budget("5%"), nbytes, args.gen, memory)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    counts = {None: min(args.requests, fit_full), **{p: min(args.requests, fit_compressed) for p in policies}}
    print(json.dumps({"pool_holds_full": fit_full, "pool_holds_5pct": fit_compressed,
                      "requests": {k or "full": v for k, v in counts.items()}}), flush=True)
    if min(counts.values()) < 1:
        raise SystemExit(f"--kv-memory-gib {args.kv_memory_gib} holds no full {args.prompt}-token sequence")
    prompts = [torch.randint(0, cfg.vocab_size, (args.prompt,), generator=g).tolist()
               for _ in range(max(counts.values()))]
    out = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "shapes": "tiny" if args.tiny else "llama-3.1-8b"}
    configs = [(None, None)] + [(p, "5%") for p in policies]
    for policy, budget in configs:  # warm-up: Triton compiles its kernels once, outside the timed rows
        run(engine, [prompts[0][:min(args.prompt, 1024)]] * 2, 2, memory, policy, budget, args.max_batch)
    rows = []
    for policy, budget in configs:
        row = run(engine, prompts[:counts[policy]], args.gen, memory, policy, budget, args.max_batch)
        print(json.dumps(row), flush=True)
        rows.append(row)
    out["rows"] = rows
    ratios = {row["policy"]: row["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"] for row in rows[1:]}
    out["decode_ratio_c_over_b"] = ratios[policies[0]]
    out["decode_ratio_c_over_b_by_policy"] = ratios
    print(json.dumps({"decode_ratio_c_over_b": ratios}), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

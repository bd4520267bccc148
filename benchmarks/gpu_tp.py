"""GPU benchmark for tensor parallelism (issue 33): Llama-3.1-8B shapes, random bf16 weights, 1 vs N GPUs.

For each device count and each configuration (full cache; SnapKV at 5%): the largest batch of P-token
prompts that each GPU's KV pool of --kv-memory-gib holds (the scheduler's own arithmetic on the largest
rank's share, memory.pool_capacity), then that batch decoding together, prefill-first as gpu_batch.py
does: decode tokens/s (generated tokens over the time in decode steps, CUDA-graph captures left out),
the most sequences decoding at once, and on N GPUs each rank's share of time in collectives. With the
pool per GPU fixed, N GPUs hold N times the sequences (each rank holds only its kv heads' cache) and
read half the weights each, so both columns should grow.

On N GPUs each rank builds its own slice of random weights on its GPU (no files: an 8B checkpoint would
be 16 GB to write), NCCL between them; rank 0 schedules (runtime/parallel/plan.LeaderBatch), the others
follow its plans, as `kvx serve --tp N` runs.

Run from the repository root, on a machine with 2 GPUs:  python3 benchmarks/gpu_tp.py --gpus 2 --out tp.json
Smoke-run of its logic on a CPU (gloo ranks, tiny shapes):
  python3 benchmarks/gpu_tp.py --tiny --device cpu --gpus 2 --prompt 300 --gen 4 --kv-memory-gib 0.002
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_decode import NullTokenizer, llama_config, random_state, tiny_config  # noqa: E402


def build(cfg, tp, device, dtype):
    """One device's model, or rank tp.rank's slice of it (random weights made on the rank)."""
    from kvx.models.sharding import local_config, replica_groups, shard_for
    from kvx.models.transformer import Transformer

    if tp is None:
        return Transformer(cfg, random_state(cfg, device, dtype))
    shard = shard_for(cfg, tp.rank, tp.world)
    if cfg.num_kv_heads < tp.world:
        tp.join_replicas(replica_groups(cfg, tp.world))
    local = local_config(cfg, shard)
    model = Transformer(local, random_state(local, tp.device, dtype, seed=tp.rank), tp=tp, full_config=cfg)
    model.shard = shard
    return model


def measure(tp, tiny, device, prompt, gen, kv_memory, policy, requests, max_batch, use_graphs):
    """The configuration's row on rank 0 (None on the other ranks)."""
    from kvx.models.sharding import largest_share
    from kvx.policies import build_policy, parse_budget
    from kvx.runtime.engine.batch_engine import BatchEngine
    from kvx.runtime.engine.model_runner import ModelRunner
    from kvx.runtime.engine.sequence import GenerationRequest
    from kvx.runtime.memory import pool_capacity

    cfg = tiny_config() if tiny else llama_config()
    dtype = torch.float32 if tiny else torch.bfloat16
    world = 1 if tp is None else tp.world
    model = build(cfg, tp, device, dtype)
    engine = ModelRunner(model, NullTokenizer(), use_graphs=use_graphs)
    share = cfg if tp is None else largest_share(cfg, world)
    nbytes = torch.empty((), dtype=dtype).element_size()
    fit_full, fit_5 = pool_capacity(share, prompt, parse_budget("5%"), nbytes, gen, kv_memory)
    count = min(requests, fit_full if policy is None else fit_5)
    if count < 1:
        raise SystemExit(f"a pool of {kv_memory} bytes holds no {prompt}-token sequence")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (prompt,), generator=g).tolist() for _ in range(count)]
    batch = BatchEngine(engine, kv_memory, max_batch, prefill_first=True)
    if tp is not None and tp.rank != 0:
        from kvx.runtime.parallel.plan import follow

        follow(batch, tp)
        return None
    if tp is not None:
        from kvx.runtime.parallel.plan import LeaderBatch

        batch = LeaderBatch(batch, tp)
    comm0 = tp.comm_s if tp is not None else 0.0
    t0 = time.perf_counter()
    seqs = [batch.submit(GenerationRequest(prompt_ids=p, max_tokens=gen, stop_at_eos=False,
                                           policy=None if policy is None else build_policy(policy),
                                           budget=None if policy is None else parse_budget("5%"))) for p in prompts]
    while batch.has_work:
        batch.step()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    inner = batch.batch if tp is not None else batch
    if tp is not None:
        batch.close()
    generated = sum(r.generated_tokens for s in seqs for r in s.results)
    decode_s = inner.decode_s - inner.stepper.capture_s
    return {"gpus": world, "policy": policy or "full", "budget": None if policy is None else "5%",
            "prompt_tokens": prompt, "sequences": count, "fits_per_device_set": fit_full if policy is None else fit_5,
            "max_running": inner.max_running, "generated_tokens": generated, "decode_s": decode_s,
            "decode_tokens_per_s": generated / decode_s, "prefill_s": inner.prefill_s, "wall_s": wall,
            "comm_share_of_run": None if tp is None else (tp.comm_s - comm0) / wall,
            "kv_memory_per_device": kv_memory}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_tp.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpus", type=int, default=2, help="the tensor-parallel size compared with one device")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke run of the script's logic)")
    ap.add_argument("--prompt", type=int, default=32768)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--kv-memory-gib", type=float, default=20.0, help="each device's KV pool")
    ap.add_argument("--requests", type=int, default=256, help="at most this many sequences per row")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--no-graph", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} GPUs")
    from kvx.runtime.parallel.launch import run_ranks

    memory = int(args.kv_memory_gib * (1 << 30))
    rows = []
    for policy in (None, "snapkv"):
        common = (args.tiny, args.device, args.prompt, args.gen, memory, policy, args.requests, args.max_batch,
                  not args.no_graph)
        row = measure(None, *common)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()  # this process is rank 0 of the split run next
        print(json.dumps(row), flush=True)
        rows.append(row)
        row = run_ranks(args.gpus, measure, common, device=args.device)
        print(json.dumps(row), flush=True)
        rows.append(row)
    by = {(r["gpus"], r["policy"]): r for r in rows}
    summary = {f"{p}: {args.gpus} GPUs / 1": {
        "decode_tokens_per_s": by[(args.gpus, p)]["decode_tokens_per_s"] / by[(1, p)]["decode_tokens_per_s"],
        "sequences": by[(args.gpus, p)]["sequences"] / by[(1, p)]["sequences"]} for p in ("full", "snapkv")}
    print(json.dumps(summary), flush=True)
    out = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "shapes": "tiny" if args.tiny else "llama-3.1-8b", "rows": rows, "summary": summary}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

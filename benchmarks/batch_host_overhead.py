"""Host time of one batched decode step: everything the CPU does per step besides the model itself.

On a GPU the step's kernels replay as a CUDA graph in a few milliseconds at 8B shapes, and what the host
does around it (reserve checks, block tables and lengths into the step's buffers, sampling, length
bookkeeping) comes on top, once per sequence and layer. This measures that part alone: a tiny model with a
real model's layer and kv-head counts (default Llama-3.1-8B's 32 x 8), S sequences decoding at a 5% budget
of a 2k prompt, and StaticStep.run replaced by a stub that returns logits at once.

Run from the repository root:  python3 benchmarks/batch_host_overhead.py --seqs 21
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

from gpu_decode import NullTokenizer, llama_config, random_state  # noqa: E402
from kvx.models.transformer import Transformer  # noqa: E402
from kvx.policies import build_policy, parse_budget  # noqa: E402
from kvx.runtime.engine.model_runner import batch_step  # noqa: E402
from kvx.runtime.engine.batch_engine import BatchEngine  # noqa: E402
from kvx.runtime.engine.model_runner import ModelRunner  # noqa: E402
from kvx.runtime.engine.sequence import DECODE, GenerationRequest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=21)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--budget", default="5%")
    ap.add_argument("--policy", default="snapkv", help="tova, h2o, ...: decode-time eviction's host work too")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = llama_config(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=args.layers,
                       num_heads=4 * args.kv_heads, num_kv_heads=args.kv_heads, head_dim=16)
    engine = ModelRunner(Transformer(cfg, random_state(cfg, "cpu", torch.float32)), NullTokenizer())
    batch = BatchEngine(engine, 4 << 30, 256, prefill_first=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(args.seqs):
        ids = torch.randint(0, cfg.vocab_size, (args.prompt,), generator=g).tolist()
        batch.submit(GenerationRequest(prompt_ids=ids, max_tokens=2 * args.steps + 8, stop_at_eos=False,
                                       policy=build_policy(args.policy), budget=parse_budget(args.budget)))
    while batch.scheduler.waiting or any(s.state != DECODE for s in batch.scheduler.running):
        batch.step()  # prefill every request (real model) before the timed steps
    logits = torch.zeros(batch_step.BATCH_BUCKETS[-1], cfg.vocab_size)
    batch_step.StaticStep.run = lambda self: logits[:self.size]  # the model's part, made free
    for _ in range(10):
        batch.step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        batch.step()
    host_ms = (time.perf_counter() - t0) / args.steps * 1e3
    assert len(batch.scheduler.running) == args.seqs
    print(json.dumps({"policy": args.policy, "seqs": args.seqs, "layers": args.layers, "kv_heads": args.kv_heads,
                      "segments_per_step": args.seqs * args.layers * args.kv_heads, "host_ms_per_step": host_ms}))


if __name__ == "__main__":
    main()

"""The serve benchmark's workload on the BatchEngine alone, in one process: no HTTP, no client sharing the
cores. It shows where the output-tokens/s ratio of a compressed cache over the full one can go at most.

    python benchmarks/serve_in_process.py [--requests 16] [--prompt 1067] [--tokens 128] [--kv-memory 220MiB]

The default model (`--dtype auto`), every request submitted at once, EOS ignored, the full cache then
snapkv at 5% in the same pool. Each phase's wall is its prefill seconds plus its decode seconds (one engine
thread does both), and the prefill is the same work in both phases, so

    ratio = (prefill + full decode) / (prefill + compressed decode) < (prefill + full decode) / prefill:

however cheap the compressed decode gets, the ratio stays under that bound.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=1067)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--kv-memory", default="220MiB")
    ap.add_argument("--policy", default="snapkv")
    ap.add_argument("--budget", default="5%")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    from kvx.options import load, parse_memory
    from kvx.policies import build_policy, parse_budget
    from kvx.runtime.engine.batch_engine import BatchEngine
    from kvx.runtime.engine.model_runner import ModelRunner
    from kvx.runtime.engine.sampling import SamplingParams
    from kvx.runtime.engine.sequence import GenerationRequest

    torch.set_num_threads(a.threads)
    llm, tok = load(None, "cpu", "auto", quiet=True)
    engine = ModelRunner(llm, tok)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (a.prompt,), generator=gen).tolist() for _ in range(a.requests)]
    phases = {}
    print("| cache | wall (s) | output tok/s | prefill (s) | decode (s) | decode steps | most running |\n"
          "|---|---|---|---|---|---|---|")
    for name in ("full", a.policy):
        policy = None if name == "full" else build_policy(name)
        budget = None if name == "full" else parse_budget(a.budget)
        batch = BatchEngine(engine, kv_memory=parse_memory(a.kv_memory), max_batch=max(32, a.requests))
        for ids in prompts:
            batch.submit(GenerationRequest(prompt_ids=ids, params=SamplingParams(), max_tokens=a.tokens,
                                           policy=policy, budget=budget, stop_at_eos=False))
        t0 = time.perf_counter()
        with torch.inference_mode():
            done = batch.run()
        wall = time.perf_counter() - t0
        out = sum(len(s.out_ids) for s in done)
        phases[name] = (wall, out, batch)
        print(f"| {name} | {wall:.1f} | {out / wall:.2f} | {batch.prefill_s:.1f} | {batch.decode_s:.1f} | "
              f"{batch.decode_steps} | {batch.max_running} |", flush=True)
    full, small = phases["full"], phases[a.policy]
    bound = (full[2].prefill_s + full[2].decode_s) / full[2].prefill_s
    print(f"\noutput tokens/s ratio {small[1] / small[0] / (full[1] / full[0]):.2f}x; "
          f"bound with a free compressed decode: {bound:.2f}x")


if __name__ == "__main__":
    main()

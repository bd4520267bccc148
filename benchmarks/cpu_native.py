"""Decode tokens/s on the CPU with kvx's C kernels (kernels/cpu_native.c) and without them (KVX_NATIVE=0).

    python benchmarks/cpu_native.py [--contexts 1024,4096] [--batch 16x1024] [--steps 32] [--rounds 3]

The default model with `--dtype auto` (int8 weights), greedy decode of prose prompts as `kvx bench` times
it (eval/bench.kvx_batch_decode_tps): one request at each context, and a batch of full caches. Each way
runs in a fresh process (the weights are laid out for the kernel at load), the two alternating round by
round so that machine drift hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(a) -> None:
    import torch

    from kvx.eval.bench import kvx_batch_decode_tps, prose_ids
    from kvx.kernels import cpu_native
    from kvx.options import load
    from kvx.runtime.engine.model_runner import ModelRunner

    torch.set_num_threads(a.threads)
    llm, tok = load(None, "cpu", "auto", quiet=True)
    engine = ModelRunner(llm, tok)
    out = {"native": cpu_native.library() is not None}
    for n, c in cases(a):
        base = prose_ids(tok, c + n)
        prompts = [base[i:i + c] for i in range(n)]  # different prompts of one length
        out[f"{n}x{c}"] = kvx_batch_decode_tps(engine, prompts, a.steps)[0]
    print(json.dumps(out))


def cases(a) -> list[tuple[int, int]]:
    out = [(1, int(c)) for c in a.contexts.split(",") if c]
    if a.batch:
        n, c = a.batch.lower().split("x")
        out.append((int(n), int(c)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--batch", default="16x1024", help="SEQUENCESxCONTEXT of full caches decoding together; '' for none")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    ways = {"pytorch": "0", "native": "1"}
    runs = {w: [] for w in ways}
    for _ in range(a.rounds):
        for w, flag in ways.items():
            cmd = [sys.executable, __file__, "--worker", "--contexts", a.contexts, "--batch", a.batch,
                   "--steps", str(a.steps), "--threads", str(a.threads)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT,
                                            env={**os.environ, "KVX_NATIVE": flag}).stdout.strip().splitlines()[-1])
            if w == "native" and not res.pop("native"):
                sys.exit("the C kernels did not load here (no C compiler?): nothing to compare")
            res.pop("native", None)
            runs[w].append(res)
    print("| sequences x context | " + " | ".join(f"{w} tok/s (each round)" for w in ways) + " | best vs best |")
    print("|---|" + "---|" * (len(ways) + 1))
    for n, c in cases(a):
        key = f"{n}x{c}"
        cells = [" / ".join(f"{r[key]:.1f}" for r in runs[w]) for w in ways]
        best = {w: max(r[key] for r in runs[w]) for w in ways}
        print(f"| {n} x {c} | " + " | ".join(cells) + f" | {best['native'] / best['pytorch']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

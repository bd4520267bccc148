"""Decode tokens/s of the CPU weight formats (models/cpu_weights.py), interleaved in fresh processes:
a lone request at --context tokens and --batch requests of --batch-context tokens decoding together.

    python benchmarks/cpu_weights.py --formats float32,bfloat16,int8 --rounds 3 --threads 2

Each run loads the default model (`--dtype float32` for float32, else `--dtype auto` with KVX_CPU_WEIGHTS),
prefills, and times --steps greedy steps after a warm-up (kvx.eval.bench.kvx_batch_decode_tps, the step
`kvx bench --suite runtime` times). Prints one JSON line: every run's tokens/s per format and the ratio
of each format's median to the first format's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

RUN = r'''
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from kvx.options import load
from kvx.eval.bench import prose_ids, kvx_batch_decode_tps
from kvx.runtime.engine.model_runner import ModelRunner
fmt, ctx, steps, batch, bctx = sys.argv[2], *map(int, sys.argv[3:7])
llm, tok = load(None, "cpu", "float32" if fmt == "float32" else "auto", quiet=True)
r = ModelRunner(llm, tok)
one = kvx_batch_decode_tps(r, [prose_ids(tok, ctx)], steps)[0]
many = kvx_batch_decode_tps(r, [prose_ids(tok, bctx)] * batch, steps)[0] if batch > 1 else 0.0
print(one, many)
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="float32,bfloat16,int8")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batch-context", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    formats = args.formats.split(",")
    runs = {f: {"batch1": [], f"batch{args.batch}": []} for f in formats}
    for _ in range(args.rounds):
        for fmt in formats:
            env = dict(os.environ, KVX_CPU_WEIGHTS=fmt if fmt != "float32" else "float32")
            out = subprocess.run([sys.executable, "-c", RUN, str(args.threads), fmt, str(args.context),
                                  str(args.steps), str(args.batch), str(args.batch_context)],
                                 env=env, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{fmt} failed: {out.stderr.strip().splitlines()[-1]}")
            one, many = map(float, out.stdout.split())
            runs[fmt]["batch1"].append(round(one, 2))
            runs[fmt][f"batch{args.batch}"].append(round(many, 2))
            print(fmt, one, many, file=sys.stderr, flush=True)
    base = formats[0]
    ratios = {f: {k: round(statistics.median(v) / statistics.median(runs[base][k]), 3)
                  for k, v in runs[f].items() if statistics.median(runs[base][k]) > 0} for f in formats}
    print(json.dumps({"threads": args.threads, "context": args.context, "batch_context": args.batch_context,
                      "steps": args.steps, "runs": runs, f"median_over_{base}": ratios}))


if __name__ == "__main__":
    main()

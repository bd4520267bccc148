"""KVzip's reconstruction cost in prefills: the passes' time over one prefill of the same context, both
measured in the same fresh process, on the default model on the CPU; optionally two source trees
interleaved (before / after a change), several rounds, medians.

    python benchmarks/kvzip_cost.py --contexts 4096,8192 --rounds 3 --threads 1
    git worktree add /tmp/kvx_old <commit>
    python benchmarks/kvzip_cost.py --before /tmp/kvx_old --after . --contexts 4096,8192 --rounds 3

Each run loads the model, warms up on a short prompt, prefills `context` tokens of prose (timed: the
prefill), runs KVzip's reconstruction passes over it (timed: reconstruction_stats, what `stats_s` counts),
both timed in the process's CPU time (`prefills`: robust on a shared machine, where the wall clock also
counts the other processes' turns; with --threads 1 it is the time an idle core would take) and in wall
time (`wall_prefills`), with the CPU time spent inside each attention kernel of kvx.kernels.ops that either
calls (`prefill_kernels_s`, `passes_kernels_s`; the rest is the linear layers and glue),
then compresses at `--budget` and hashes the kept (layer, kv head, position) sets, so that two trees can be
checked to keep exactly the same entries. Prints one JSON line per run and a summary line per (tree,
context): the median cost in prefills and whether every run's kept sets were identical.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

RUN = r'''
import hashlib, json, os, sys, time, torch
import kvx
assert os.path.dirname(os.path.dirname(os.path.abspath(kvx.__file__))) == sys.argv[1], kvx.__file__
del sys.argv[1]
torch.set_num_threads(int(sys.argv[3]))
from kvx.options import load
from kvx.eval.bench import prose_ids, _pool_for
from kvx.runtime.engine.model_runner import ModelRunner
from kvx.policies import build_policy, parse_budget
from kvx.runtime.compression.reconstruction import reconstruction_stats
n, dtype, budget_text = int(sys.argv[1]), sys.argv[2], sys.argv[4]
llm, tok = load(None, "cpu", dtype, quiet=True)
eng = ModelRunner(llm, tok)
ids = prose_ids(tok, min(n, eng.config.max_position_embeddings - 1))
policy, budget = build_policy("kvzip"), parse_budget(budget_text)
warm = ids[:128]
w = eng.new_request(_pool_for(eng, [warm], 0), capacity=len(warm))
eng.forward(w, warm)
req = eng.new_request(_pool_for(eng, [ids], 0, policy, budget), capacity=len(ids), policy=policy, budget=budget)
sr = eng.stats_request(req, len(ids))
phases = {}  # CPU seconds inside each attention kernel the prefill and the passes call (kernels/ops.py)
from kvx.kernels import ops
def timed(name, f):
    def g(*a, **k):
        t = time.process_time(); r = f(*a, **k); phases[name] = phases.get(name, 0.0) + time.process_time() - t
        return r
    return g
for name in ("attention", "column_max", "reconstruction_attention"):
    if hasattr(ops, name):
        setattr(ops, name, timed(name, getattr(ops, name)))
w0, c0 = time.perf_counter(), time.process_time()
eng.forward(req, ids, sr)
w1, c1 = time.perf_counter(), time.process_time()
in_prefill = dict(phases); phases.clear()
req.stats = reconstruction_stats(eng, req, ids, req.stats, sr)
w2, c2 = time.perf_counter(), time.process_time()
prefill, passes = c1 - c0, c2 - c1
eng.compress(req, headroom=0)
h = hashlib.sha256()
for layer, lc in enumerate(req.cache.layers):
    for g in range(eng.config.num_kv_heads):
        h.update(lc.head(g)[2].to(torch.int64).sort().values.numpy().tobytes())
print(json.dumps({"context": len(ids), "prefill_s": round(prefill, 2), "passes_s": round(passes, 2),
                  "prefills": round(passes / prefill, 3), "wall_prefills": round((w2 - w1) / (w1 - w0), 3),
                  "kept": h.hexdigest()[:16],
                  "prefill_kernels_s": {k: round(v, 2) for k, v in in_prefill.items()},
                  "passes_kernels_s": {k: round(v, 2) for k, v in phases.items()}}))
'''
def run_once(tree: str, context: int, args) -> dict:
    tree = os.path.abspath(tree)
    env = dict(os.environ, PYTHONPATH=tree)
    # cwd=tree: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH
    out = subprocess.run([sys.executable, "-c", RUN, tree, str(context), args.dtype, str(args.threads),
                          args.budget], env=env, cwd=tree, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"{tree} failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="source tree (a folder holding kvx/) before the change; omit to time one tree")
    ap.add_argument("--after", default=".", help="source tree after the change (default: this checkout)")
    ap.add_argument("--contexts", default="4096,8192", help="context lengths (8192 is cut to the model's limit - 1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", help="auto (float32 on the CPU), float32 or bfloat16")
    ap.add_argument("--budget", default="10%", help="the budget whose kept sets are hashed")
    args = ap.parse_args()
    trees = {"before": args.before, "after": args.after} if args.before else {"after": args.after}
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.rounds):
        for context in (int(c) for c in args.contexts.split(",")):
            for name, tree in trees.items():
                r = run_once(tree, context, args)
                runs.setdefault((name, context), []).append(r)
                print(json.dumps({"tree": name, **r}), flush=True)
    for (name, context), rs in runs.items():
        kept = {r["kept"] for r in rs}
        print(json.dumps({"tree": name, "context": rs[0]["context"], "threads": args.threads, "dtype": args.dtype,
                          "median_prefill_s": statistics.median(r["prefill_s"] for r in rs),
                          "median_passes_s": statistics.median(r["passes_s"] for r in rs),
                          "median_prefills": statistics.median(r["prefills"] for r in rs),
                          "all_prefills": [r["prefills"] for r in rs],
                          "median_wall_prefills": statistics.median(r["wall_prefills"] for r in rs),
                          "kept": sorted(kept)}))


if __name__ == "__main__":
    main()

"""Decode tokens/s of a lone request (a batch of one, as `kvx generate` runs it), two source trees
interleaved in fresh processes: before / after a runtime change, on the default model, CPU, float32.

    git worktree add /tmp/kvx_old <commit>
    python benchmarks/decode_before_after.py --before /tmp/kvx_old --after . --context 1024 --steps 32 --rounds 4

Each run loads the model, prefills `--context` tokens of prose and times `--steps` greedy steps after a
warm-up (kvx.eval.bench.kvx_decode_tps, the step `kvx bench --suite runtime` times). Prints one JSON line:
every run's tokens/s for both trees and the ratio of their medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

RUN = r'''
import os, sys, torch
torch.set_num_threads(2)
import kvx
# `python -c` puts the working directory first on sys.path: each tree runs from its own folder, and this
# checks that the kvx imported is that tree's (a run from a checkout would otherwise import the checkout).
assert os.path.dirname(os.path.dirname(os.path.abspath(kvx.__file__))) == os.getcwd(), kvx.__file__
from kvx.options import load
from kvx.eval.bench import prose_ids, kvx_decode_tps
try:
    from kvx.runtime.engine.model_runner import ModelRunner as Runner
except ImportError:  # a tree from before the runtime's layout by concept
    from kvx.runtime.engine import Engine as Runner
llm, tok = load(None, "cpu", "float32", quiet=True)
print(kvx_decode_tps(Runner(llm, tok), prose_ids(tok, int(sys.argv[1])), int(sys.argv[2])))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="source tree (a folder holding kvx/) before the change")
    ap.add_argument("--after", default=".", help="source tree after the change (default: this checkout)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    runs: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name in ("before", "after"):
            tree = os.path.abspath(getattr(args, name))
            env = dict(os.environ, PYTHONPATH=tree)
            out = subprocess.run([sys.executable, "-c", RUN, str(args.context), str(args.steps)], env=env,
                                 capture_output=True, text=True, cwd=tree)
            if out.returncode != 0:
                sys.exit(f"{name} failed: {out.stderr.strip().splitlines()[-1]}")
            runs[name].append(round(float(out.stdout.strip().splitlines()[-1]), 3))
    ratio = statistics.median(runs["after"]) / statistics.median(runs["before"])
    print(json.dumps({"context": args.context, "steps": args.steps, **runs, "after_over_before": round(ratio, 3)}))


if __name__ == "__main__":
    main()

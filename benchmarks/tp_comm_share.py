"""The communication's share of a decode step with tensor-parallel ranks (issue 33's CPU benchmark).

    python benchmarks/tp_comm_share.py [--tp 2] [--prompt 1024] [--tokens 32] [--policy full|snapkv ...]

The measurement is kvx.eval.tp_bench (also `kvx bench --suite tensor-parallel --tp N`): one greedy request
on the default model (or --model) over N ranks (gloo on the CPU, kvx spawns them) and on one rank in the
same run; per rank the decode step's wall time, the time inside collectives and that share, and the bare
all-reduce's time. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--policy", default="full")
    ap.add_argument("--budget", default=None)
    args = ap.parse_args()

    from kvx.eval.tp_bench import tensor_parallel_suite
    from kvx.models.hub import resolve_model

    path = str(resolve_model(args.model))
    print(json.dumps(tensor_parallel_suite(path, args.tp, args.prompt, args.tokens, args.policy, args.budget),
                     indent=1))


if __name__ == "__main__":
    main()

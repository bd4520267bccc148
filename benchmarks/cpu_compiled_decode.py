"""Batch-1 decode tokens/s on the CPU, eager against `--compile` (models/compiled_decode.py), in one process.

    python benchmarks/cpu_compiled_decode.py [--contexts 1024,4096] [--steps 64] [--rounds 3] [--threads 2]

The default model with `--dtype auto` (int8 weights), a prose prompt of each length, greedy decode as
`kvx bench --suite runtime` times it (eval/bench.kvx_decode_tps); eager and compiled alternate round by
round on the same loaded model (the compiled forward is switched on and off), so machine drift hits both.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    from kvx.eval.bench import kvx_decode_tps, prose_ids
    from kvx.models.compiled_decode import compile_decode
    from kvx.options import load
    from kvx.runtime.engine.model_runner import ModelRunner

    torch.set_num_threads(a.threads)
    llm, tok = load(None, "cpu", "auto", quiet=True)
    engine = ModelRunner(llm, tok)
    t0 = time.perf_counter()
    compile_decode(llm)
    print(f"compile: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    compiled = llm.compiled_decode
    print("| context | eager tok/s (each round) | compiled tok/s (each round) | best vs best |\n|---|---|---|---|")
    for n in (int(c) for c in a.contexts.split(",")):
        ids = prose_ids(tok, n)
        runs = {"eager": [], "compiled": []}
        for _ in range(a.rounds):
            for way in runs:
                llm.compiled_decode = compiled if way == "compiled" else None
                runs[way].append(kvx_decode_tps(engine, ids, a.steps))
        cells = [" / ".join(f"{x:.1f}" for x in runs[w]) for w in runs]
        print(f"| {n} | {cells[0]} | {cells[1]} | {max(runs['compiled']) / max(runs['eager']):.2f}x |", flush=True)


if __name__ == "__main__":
    main()

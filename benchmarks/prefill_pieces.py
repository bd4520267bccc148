"""A split prefill with and without its short last piece joined to the one before, timed in one process.

    python benchmarks/prefill_pieces.py [--tokens 1067] [--step 512] [--rounds 4] [--threads 2]

The default model (`--dtype auto`: int8 weights on the CPU), snapkv at 5%, the prompt prefilled as the
batched engine does it (split_prefill.prefill_pieces), rounds interleaved; prints each round and the best.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1067)
    ap.add_argument("--step", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    from kvx.options import load
    from kvx.policies import build_policy, parse_budget
    from kvx.runtime.cache.pool import BlockPool
    from kvx.runtime.compression import split_prefill
    from kvx.runtime.engine.model_runner import ModelRunner

    torch.set_num_threads(a.threads)
    llm, tok = load(None, "cpu", "auto", quiet=True)
    engine = ModelRunner(llm, tok)
    cfg = llm.config
    pool = BlockPool.for_memory(4 * a.tokens * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 8,
                                cfg.num_kv_heads, cfg.head_dim, engine.dtype, engine.device)
    ids = torch.randint(100, 40000, (a.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    joined = split_prefill.without_short_tail

    def once(join: bool) -> float:
        split_prefill.without_short_tail = joined if join else (lambda pieces, step: pieces)
        req = engine.new_request(pool, capacity=a.tokens, policy=build_policy("snapkv"), budget=parse_budget("5%"))
        t0 = time.perf_counter()
        steps = split_prefill.prefill_pieces(engine, req, ids, a.step)
        try:
            while True:
                next(steps)
        except StopIteration:
            pass
        dt = time.perf_counter() - t0
        req.cache.release()
        return dt

    runs = {False: [], True: []}
    with torch.inference_mode():
        once(False), once(True)  # warm-up
        for _ in range(a.rounds):
            for join in (False, True):
                runs[join].append(once(join))
    split_prefill.without_short_tail = joined
    for join, label in ((False, "pieces as cut"), (True, "short tail joined")):
        bounds = split_prefill.piece_bounds(a.tokens, a.step, 32)
        shown = joined(bounds, a.step) if join else bounds
        print(f"{label} {[e - s for s, e in shown]}: " + " / ".join(f"{x * 1e3:.0f}" for x in runs[join])
              + f" ms, best {min(runs[join]) * 1e3:.0f} ms")
    print(f"best joined vs as cut: {min(runs[False]) / min(runs[True]):.3f}x faster")


if __name__ == "__main__":
    main()

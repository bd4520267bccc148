"""The communication's share of a decode step with tensor-parallel ranks (issue 33's CPU benchmark).

    python benchmarks/tp_comm_share.py [--tp 2] [--prompt 1024] [--tokens 32] [--policy full|snapkv ...]

Runs one greedy request on the default model (or --model) over N ranks (gloo on the CPU: kvx spawns them),
through the one engine, and reports per rank: the decode steps' wall time, the time inside collectives
(the o_proj and down_proj all-reduces of every layer and the broadcast of rank 0's tokens) and that
share. Waiting for a slower rank counts as communication: a rank that holds fewer kv heads waits for the
other inside the all-reduce. One rank (no collectives) is timed in the same run, for reference.
"""

from __future__ import annotations

import argparse
import json
import time


def decode_timing(tp, path: str, prompt: int, tokens: int, policy: str, budget: str | None) -> dict:
    import torch

    from kvx.eval.haystack import filler_ids
    from kvx.models.tokenizer import Tokenizer
    from kvx.models.transformer import Transformer
    from kvx.policies import build_policy, parse_budget
    from kvx.runtime.engine.batch_engine import BatchEngine
    from kvx.runtime.engine.model_runner import ModelRunner
    from kvx.runtime.engine.sequence import DECODE, GenerationRequest

    if tp is None:
        model, tok = Transformer.from_pretrained(path), Tokenizer.from_dir(path)
    else:
        from kvx.models.sharding import load_sharded

        model, tok = load_sharded(path, tp.rank, tp.world, tp)
    runner = ModelRunner(model, tok)
    batch = BatchEngine(runner, kv_memory=512 << 20, max_batch=1)
    ids = filler_ids(tok, prompt)
    pol = None if policy == "full" else build_policy(policy)
    seq = batch.submit(GenerationRequest(prompt_ids=ids, max_tokens=tokens, stop_at_eos=False, policy=pol,
                                         budget=None if budget is None else parse_budget(budget)))
    while seq.state != DECODE:
        batch.step()
    comm0, calls0 = (tp.comm_s, tp.calls) if tp is not None else (0.0, 0)
    t0 = time.perf_counter()
    steps0 = batch.decode_steps
    while batch.has_work:
        batch.step()
    wall = time.perf_counter() - t0
    steps = batch.decode_steps - steps0  # forward passes (the last engine step only ends the answer)
    out = {"rank": 0 if tp is None else tp.rank, "threads": torch.get_num_threads(), "steps": steps,
           "decode_ms_per_step": 1000 * wall / steps}
    if tp is not None:
        comm = tp.comm_s - comm0
        out.update(comm_ms_per_step=1000 * comm / steps, comm_share=comm / wall,
                   collectives_per_step=(tp.calls - calls0) / steps, kv_heads=model.config.num_kv_heads)
        import torch.distributed as dist

        parts = [None] * tp.world
        dist.all_gather_object(parts, out)
        return parts
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--policy", default="full")
    ap.add_argument("--budget", default=None)
    args = ap.parse_args()

    import torch

    from kvx.models.hub import resolve_model
    from kvx.runtime.parallel.launch import run_ranks

    path = str(resolve_model(args.model))
    spec = (path, args.prompt, args.tokens, args.policy, args.budget)
    threads = torch.get_num_threads()
    ranks = run_ranks(args.tp, decode_timing, spec)  # each rank takes its share of the cores
    torch.set_num_threads(threads)  # one rank: every core
    one = decode_timing(None, *spec)
    print(json.dumps({"one_rank": one, "ranks": ranks}, indent=1))


if __name__ == "__main__":
    main()

"""Where a tensor-parallel decode step's time goes: `kvx bench --suite tensor-parallel --tp N` and
benchmarks/tp_comm_share.py.

One greedy request (prose filler of `prompt` tokens, `tokens` decoded, stop at EOS off) runs through the one
engine on N ranks (kvx spawns them: gloo on the CPU, NCCL on GPUs) and, in the same run, on one rank with
one core and with every core. Per rank: the decode steps' wall time, the time inside collectives (every
layer's o_proj and down_proj all-reduces and the broadcast of rank 0's tokens) and its share, and the same
all-reduce timed back to back with nothing else running (the transport's floor). Waiting for a slower rank
counts as communication: a rank with fewer kv heads waits for the other inside the all-reduce.
"""

from __future__ import annotations

import os
import time


def decode_timing(tp, path: str, prompt: int, tokens: int, policy: str, budget: str | None, device: str = "cpu"):
    import torch

    from kvx.eval.haystack import filler_ids
    from kvx.models.tokenizer import Tokenizer
    from kvx.models.transformer import Transformer
    from kvx.policies import build_policy, parse_budget
    from kvx.runtime.engine.batch_engine import BatchEngine
    from kvx.runtime.engine.model_runner import ModelRunner
    from kvx.runtime.engine.sequence import DECODE, GenerationRequest

    if tp is None:
        model, tok = Transformer.from_pretrained(path, device=device), Tokenizer.from_dir(path)
    else:
        from kvx.models.sharding import load_sharded

        model, tok = load_sharded(path, tp.rank, tp.world, tp, device=tp.device)
    batch = BatchEngine(ModelRunner(model, tok), kv_memory=512 << 20, max_batch=1)
    pol = None if policy == "full" else build_policy(policy)
    seq = batch.submit(GenerationRequest(prompt_ids=filler_ids(tok, prompt)[:prompt], max_tokens=tokens,
                                         stop_at_eos=False, policy=pol,
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
    out = {"rank": 0 if tp is None else tp.rank, "threads": torch.get_num_threads(), "decode_steps": steps,
           "decode_ms_per_step": 1000 * wall / steps}
    if tp is None:
        return out
    comm, calls = tp.comm_s - comm0, tp.calls - calls0
    out.update(comm_ms_per_step=1000 * comm / steps, comm_share=comm / wall, collectives_per_step=calls / steps,
               comm_ms_per_collective=1000 * comm / calls, kv_heads=model.config.num_kv_heads)
    x = torch.zeros(1, model.config.hidden_size, device=tp.device)
    for _ in range(10):
        tp.all_reduce(x)
    t1 = time.perf_counter()
    for _ in range(200):
        tp.all_reduce(x)
    out["bare_all_reduce_ms"] = 1000 * (time.perf_counter() - t1) / 200
    import torch.distributed as dist

    parts = [None] * tp.world
    dist.all_gather_object(parts, out)
    return parts


def tensor_parallel_suite(path: str, world: int, prompt: int = 1024, tokens: int = 32, policy: str = "full",
                          budget: str | None = None, device: str = "cpu") -> dict:
    """{"ranks": [per rank], "one_rank": {"1_threads": ..., "<all>_threads": ...}} (CPU), measured in one run."""
    import torch

    from kvx.runtime.parallel.launch import run_ranks

    threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    spec = (path, prompt, tokens, policy, budget)
    ranks = run_ranks(world, decode_timing, spec, device=device)  # each rank takes its share of the cores
    one = {}
    for n in sorted({1, threads}) if device == "cpu" else [threads]:
        torch.set_num_threads(n)
        one[f"{n}_threads"] = decode_timing(None, *spec, device=device)
    torch.set_num_threads(threads)
    return {"ranks": ranks, "one_rank": one, "load_average_1min": [load, os.getloadavg()[0]],
            "cores": os.cpu_count(), "torch": torch.__version__, "prompt": prompt, "tokens": tokens,
            "policy": policy, "budget": budget}

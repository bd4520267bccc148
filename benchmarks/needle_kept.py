"""Which of a needle's tokens each policy keeps: the share of (layer, kv head) caches holding each token.

    python benchmarks/needle_kept.py --context 4096 --budget 5% --policies "tova,tova[heads=layer],snapkv"

Explains eval scores below the task level: a passkey is answered only when its digits survive in the heads
that retrieve it. Question-aware (the whole prompt is prefilled, then compressed); one shared prefill
(eval.prefill.SharedPrefill), each policy forked from it and compressed into a pool of its own, its kept
entries read from their block tables, then answered as a batch of one (the engine `kvx eval` runs).
Smoke run on the default model:  python benchmarks/needle_kept.py --context 300 --policies snapkv,h2o
"""

from __future__ import annotations

import argparse

import torch

from kvx.eval.prefill import SharedPrefill
from kvx.eval.prompt import build_prompt
from kvx.eval.tasks import generate
from kvx.models import load_model
from kvx.models.hub import pull_default_model
from kvx.policies import build_policy, parse_budget
from kvx.policies.registry import parse_policy_spec, policy_label, split_policy_list
from kvx.runtime.engine.batch_engine import BatchEngine
from kvx.runtime.engine.model_runner import ModelRunner
from kvx.runtime.cache.pool import DEFAULT_BLOCK_SIZE, BlockPool
from kvx.runtime.engine.scheduler import held_blocks
from kvx.runtime.engine.sequence import GenerationRequest

ANSWER_TOKENS = 8


def needle_positions(tok, prompt_ids: list[int], answer: str) -> list[int]:
    """Positions of the answer's tokens in the prompt (the first place where they all appear in order)."""
    want = tok.encode(" " + answer, add_special_tokens=False)
    for variant in (want, want[1:]):
        n = len(variant)
        for i in range(len(prompt_ids) - n + 1):
            if prompt_ids[i:i + n] == variant:
                return list(range(i, i + n))
    raise SystemExit(f"the answer {answer!r} is not in the prompt as tokens {want}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--policies", default="snapkv,ada-snapkv,laprox,h2o,ahakv")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--haystack", default="noise")
    args = ap.parse_args()

    model, tok = load_model(pull_default_model(quiet=True))
    engine = ModelRunner(model, tok)
    sample = generate("passkey", tok, args.context, args.seed, args.depth, args.haystack)
    prompt = build_prompt(tok, sample)
    ids = prompt.full
    where = needle_positions(tok, ids, sample.answers[0])
    budget = parse_budget(args.budget)
    specs = [parse_policy_spec(spec) for spec in split_policy_list(args.policies)]
    pairs = [(build_policy(name, args=opts), budget) for name, opts in specs]
    labels = [policy_label(name, opts) for name, opts in specs]
    shared = SharedPrefill(engine, ids, pairs)
    pieces = [tok.decode([ids[p]]) for p in where]
    print(f"passkey {sample.answers[0]} at positions {where[0]}..{where[-1]} of {len(ids)}; budget {budget}")
    print(f"{'policy':<24}" + "".join(f"{p!r:>8}" for p in pieces) + "     all   answer")
    print("(share of the layer x kv-head caches that keep each needle token; all: that keep every one of them)")
    for label, (policy, _) in zip(labels, pairs):
        kept, answer = kept_and_answer(engine, shared, ids, policy, budget, where)
        held, whole = kept.float().mean(0), kept.all(1).float().mean().item()
        print(f"{label:<24}" + "".join(f"{x:>8.2f}" for x in held.tolist()) + f"{whole:>8.2f}   {answer}")


def kept_and_answer(engine, shared, ids: list[int], policy, budget, where: list[int]) -> tuple[torch.Tensor, str]:
    """For one (policy, budget) forked from the shared prefill: [segments, len(where)] whether each (layer,
    kv head) cache keeps each of the positions `where` after compression, and the first word of the answer."""
    cfg = engine.config
    blocks = held_blocks(cfg, DEFAULT_BLOCK_SIZE, len(ids), 0, ANSWER_TOKENS, policy, budget)
    pool = BlockPool(blocks, DEFAULT_BLOCK_SIZE, cfg.head_dim, engine.dtype, engine.device)
    req = shared.fork(policy, budget)
    engine.compress(req, headroom=ANSWER_TOKENS, pool=pool)
    want = torch.tensor(where)
    kept = torch.stack([torch.isin(want, lc.head_positions(g).cpu())
                        for lc in req.cache.layers for g in range(cfg.num_kv_heads)])
    batch = BatchEngine(engine, pool=pool, max_batch=1)
    seq = batch.adopt(req, GenerationRequest(prompt_ids=ids, max_tokens=ANSWER_TOKENS), shared.logits)
    batch.run()
    if seq.error is not None:
        raise SystemExit(seq.error)
    return kept, (seq.results[0].text.split() or [""])[0]

if __name__ == "__main__":
    main()

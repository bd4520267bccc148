"""KVzip probe: answer one passkey sample (4k, depth 50%) question-agnostic under given kvzip options and
budgets, and print where the pass key sits in the context (is the chunk boundary the cause of a miss?).

Each (options, budget) is a lone question-agnostic request (kvx.runtime.engine.batch_engine.generate_agnostic: a batch of
one, what `kvx generate --context -q` runs).

Run from the repository root:  python3 benchmarks/kvzip_chunk_probe.py 2 "kvzip;kvzip[chunk=4096]" 5%,10%
A smaller context (a fourth argument) for a quick run:  python3 benchmarks/kvzip_chunk_probe.py 2 kvzip 10% 300
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvx.eval import tasks as task_gen  # noqa: E402
from kvx.eval.prompt import build_prompt  # noqa: E402
from kvx.models.hub import pull_default_model  # noqa: E402
from kvx.options import load  # noqa: E402
from kvx.policies import build_policy, parse_budget  # noqa: E402
from kvx.policies.registry import parse_policy_spec  # noqa: E402
from kvx.runtime.engine.batch_engine import generate_agnostic  # noqa: E402
from kvx.runtime.engine.model_runner import ModelRunner  # noqa: E402


def main(argv: list[str]) -> None:
    if len(argv) not in (3, 4):
        raise SystemExit(__doc__)
    seed, specs, budgets = int(argv[0]), argv[1].split(";"), argv[2].split(",")
    context = int(argv[3]) if len(argv) == 4 else 4096
    torch.set_num_threads(1)
    folder = pull_default_model(quiet=True)
    llm, tok = load(str(folder), "cpu", "float32", quiet=True)
    eng = ModelRunner(llm, tok)
    s = task_gen.generate("passkey", tok, context, seed, 0.5, "noise")
    p = build_prompt(tok, s)
    key_ids = tok.encode(" " + s.answers[0], add_special_tokens=False)
    ctx = p.context
    ids = list(key_ids.ids if hasattr(key_ids, "ids") else key_ids)
    where = [i for i in range(len(ctx)) if ctx[i:i + len(ids)] == ids]
    print("seed", seed, "key", s.answers[0], "context tokens", len(ctx), "key at", where, flush=True)
    for spec in specs:
        name, options = parse_policy_spec(spec)
        for b in budgets:
            t = time.perf_counter()
            out = generate_agnostic(eng, ctx, [p.question], max_tokens=12, policy=build_policy(name, args=options),
                                    budget=parse_budget(b))
            print(spec, b, repr(tok.decode(out[0].token_ids)), f"{time.perf_counter() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

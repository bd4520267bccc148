"""KVzip probe: answer one passkey sample (4k, depth 50%) question-agnostic under given kvzip options and
budgets, and print where the pass key sits in the context (is the chunk boundary the cause of a miss?).

Run from the repository root:  python3 benchmarks/kvzip_chunk_probe.py 2 "kvzip;kvzip[chunk=4096]" 5%,10%
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvx.options import load
from kvx.models.hub import pull_default_model
from kvx.eval import tasks as task_gen
from kvx.eval.prompt import build_prompt
from kvx.policies import build_policy, parse_budget
from kvx.policies.registry import parse_policy_spec
from kvx.runtime.engine import Engine
torch.set_num_threads(1)
folder = pull_default_model(quiet=True)
llm, tok = load(str(folder), "cpu", "float32", quiet=True)
eng = Engine(llm, tok)
seed = int(sys.argv[1]); specs = sys.argv[2].split(";")
s = task_gen.generate("passkey", tok, 4096, seed, 0.5, "noise")
p = build_prompt(tok, s)
key_ids = tok.encode(" " + s.answers[0], add_special_tokens=False)
ctx = p.context
ids = list(key_ids.ids if hasattr(key_ids, "ids") else key_ids)
where = [i for i in range(len(ctx)) if ctx[i:i + len(ids)] == ids]
print("seed", seed, "key", s.answers[0], "context tokens", len(ctx), "key at", where, flush=True)
for spec in specs:
    for b in sys.argv[3].split(","):
        t = time.perf_counter()
        out = eng.generate_agnostic(ctx, [p.question], max_tokens=12, policy=build_policy(parse_policy_spec(spec)[0], args=parse_policy_spec(spec)[1]), budget=parse_budget(b))
        print(spec, b, repr(tok.decode(out[0].token_ids)), f"{time.perf_counter() - t:.0f}s", flush=True)

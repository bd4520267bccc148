"""Which thread runs the model matters on the CPU: batched decode steps timed three ways in one process.

    python benchmarks/engine_thread.py [--requests 4] [--prompt 1024] [--tokens 48] [--threads 2]

1. main: the model loaded and stepped on the main thread (what `kvx generate --jsonl` does);
2. split: loaded on the main thread, stepped on a second one (what `kvx serve` did before
   kvx/serve/compute_thread.py: the event loop on the main thread, the engine on its own);
3. one thread: loaded and stepped on the second thread, the main thread running no tensor op (`kvx serve` now).

Each way runs in a fresh process (a thread's OpenMP team outlives its work), rounds interleaved; the
figure is the mean decode step (ms) of a batch of `--requests` full caches, as BatchEngine counts it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _load(threads: int):
    import torch

    from kvx.options import load
    from kvx.runtime.engine.model_runner import ModelRunner

    torch.set_num_threads(threads)
    llm, tok = load(None, "cpu", "auto", quiet=True)
    return ModelRunner(llm, tok)


def _decode_ms(engine, requests: int, prompt: int, tokens: int) -> float:
    import torch

    from kvx.runtime.engine.batch_engine import BatchEngine
    from kvx.runtime.engine.sampling import SamplingParams
    from kvx.runtime.engine.sequence import GenerationRequest

    gen = torch.Generator().manual_seed(0)
    batch = BatchEngine(engine, kv_memory=requests * 64 << 20, max_batch=requests, prefill_first=True)
    for _ in range(requests):
        ids = torch.randint(100, 40000, (prompt,), generator=gen).tolist()
        batch.submit(GenerationRequest(prompt_ids=ids, params=SamplingParams(), max_tokens=tokens, stop_at_eos=False))
    with torch.inference_mode():
        batch.run()
    return batch.decode_s / batch.decode_steps * 1e3


def one_way(way: str, a) -> float:
    box = {}
    if way == "main":
        return _decode_ms(_load(a.threads), a.requests, a.prompt, a.tokens)
    if way == "split":
        engine = _load(a.threads)
        work = lambda: box.update(ms=_decode_ms(engine, a.requests, a.prompt, a.tokens))  # noqa: E731
    else:
        work = lambda: box.update(ms=_decode_ms(_load(a.threads), a.requests, a.prompt, a.tokens))  # noqa: E731
    t = threading.Thread(target=work)
    t.start()
    t.join()
    return box["ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--way", default=None, help=argparse.SUPPRESS)  # one measurement, in this process
    a = ap.parse_args()
    if a.way:
        print(json.dumps({"ms": one_way(a.way, a)}))
        return
    ways = ("main", "split", "one thread")
    runs = {w: [] for w in ways}
    for _ in range(a.rounds):
        for w in ways:
            cmd = [sys.executable, __file__, "--way", w, "--requests", str(a.requests), "--prompt", str(a.prompt),
                   "--tokens", str(a.tokens), "--threads", str(a.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[w].append(json.loads(out.strip().splitlines()[-1])["ms"])
            print(f"{w}: {runs[w][-1]:.1f} ms a step", file=sys.stderr, flush=True)
    base = min(runs["main"])
    print("| model loaded and stepped on | decode step, ms (each round) | best vs main |\n|---|---|---|")
    for w in ways:
        print(f"| {w} | {' / '.join(f'{x:.1f}' for x in runs[w])} | {min(runs[w]) / base:.2f}x |")


if __name__ == "__main__":
    main()

"""`kvx bench --suite runtime`'s extras: `--breakdown` (where a decode step's time goes) and
`--against llama.cpp` (the peer on the same weights, side by side as ratios)."""

from __future__ import annotations

import sys

PEERS = ("llama.cpp",)


def check_against(against: str | None, model: str | None) -> None:
    """Before the model loads: a known peer, on the default model (the one whose GGUF the peer runs)."""
    from kvx.errors import KvxError

    if against is None:
        return
    if against not in PEERS:
        raise KvxError(f"--against: unknown peer {against!r}; use llama.cpp")
    if model is not None:
        raise KvxError("--against llama.cpp: runs on the default model only (its GGUF is what llama.cpp reads)")


def breakdown_tables(engine, tok, context: int, show) -> list:
    from kvx.eval.breakdown import PARTS, breakdowns

    rows = breakdowns(engine, tok, context, batches=(1, 16), progress=show)
    parts = (*PARTS, "other")
    body = []
    for r in rows:
        body.append([r.batch, r.context, r.weights, f"{r.step_ms:.1f}"]
                    + [f"{r.parts_ms[p]:.1f} ({100 * r.parts_ms[p] / r.step_ms:.0f}%)" for p in parts])
    return [("a decode step's time (ms per step; torch.profiler, other = step - the rest)",
             ["batch", "context", "weights", "step ms", *parts], body)]


def llamacpp_tables(engine, tok, runtime_rows, threads: int, repeats: int, decode_steps: int,
                    prefill_ns: list[int], decode_ns: list[int], show) -> list:
    """llama.cpp on F32 and on the type matching kvx's weights, beside kvx's own rows of this run."""
    from kvx.eval import peer_llamacpp as peer
    from kvx.eval.bench import kvx_batch_decode_tps, prose_ids
    from kvx.models.cpu_weights import format_name

    tools = peer.find_tools()
    if tools is None:
        print(f"kvx bench: {peer.HOW_TO_GET}", file=sys.stderr, flush=True)
        return []
    weights = format_name(engine.model)
    types = ["F32"] + ([peer.MATCHING_TYPE[weights]] if peer.MATCHING_TYPE.get(weights, "F32") != "F32" else [])
    prompt, sequences, gen = 1024, 16, 64
    # kvx's batch row: `sequences` full caches of `prompt` tokens decoding together, as llama-batched-bench
    kvx_rows = {(r.phase, r.context, 1): r.kvx_tokens_per_s for r in runtime_rows}
    ids = prose_ids(tok, prompt)
    tps = sorted(kvx_batch_decode_tps(engine, [ids] * sequences, min(decode_steps, gen))[0] for _ in range(repeats))
    kvx_rows[("batch decode", prompt, sequences)] = tps[len(tps) // 2]
    peers: dict[tuple, dict[str, float]] = {}
    for t in types:
        gguf = peer.peer_gguf(tools, t)
        rows = peer.llama_bench(tools, gguf, t, threads, prefill_ns, decode_ns, gen, repeats)
        rows += peer.batched_bench(tools, gguf, t, threads, prompt, gen, [sequences])
        for r in rows:
            show(r)
            peers.setdefault((r.phase, r.context, r.sequences), {})[t] = r.tokens_per_s
    body = []
    for key, k in kvx_rows.items():
        cells = []
        # kvx's longest decode context is clipped below the model's limit (8172 of 8192): pair it with
        # llama.cpp's depth within 1% of it
        near = [pk for pk in peers if pk[0] == key[0] and pk[2] == key[2] and abs(pk[1] - key[1]) <= key[1] // 100]
        match = min(near, key=lambda pk: abs(pk[1] - key[1]), default=key)
        for t in types:
            p = peers.get(match, {}).get(t)
            cells += ["-" if p is None else f"{p:.1f}", "-" if p is None else f"{k / p:.2f}x"]
        body.append([key[0], key[1], key[2], f"{k:.1f}", *cells])
    cols = ["phase", "context", "sequences", f"kvx ({weights})"]
    for t in types:
        cols += [f"llama.cpp {t}", f"kvx / {t}"]
    return [(f"kvx vs llama.cpp, {threads} threads (tokens/s, median of {repeats})", cols, body)]

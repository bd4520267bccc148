"""GPU benchmark: kvx's one engine (the batched, paged engine; a lone request is a batch of one) decoding on
Llama-3.1-8B shapes (random bf16 weights), against transformers, with and without CUDA graphs.

Measures, in one run on one device, most important first (results saved after every row, so a run cut
off by its timeout keeps what it measured):
- a device-to-device copy (bytes read + written per second): the bandwidth ceiling;
- greedy tokens in float32 (default-model shapes, random weights): on the GPU against the CPU for a batch
  of one (kvx.runtime.engine.batch_engine.generate, what `kvx generate` runs) and a batch of many, CUDA graphs on and
  off, full cache, SnapKV 10% and TOVA 10% (decode-time eviction); and transformers (sdpa) on the GPU
  against kvx for the full cache;
- kvx batch-of-one decode tokens/s at 1k, 8k, 32k context, full cache and a 5% budget (SnapKV), graphs on
  and off, and the achieved bandwidth (weights + KV bytes actually read per step) / copy bandwidth;
- kvx decode tokens/s of a batch of many (--batch sequences of --batch-context tokens, all decoding at
  once), full cache and 5%, graphs on and off;
- decode-time eviction (TOVA 5% at 8k, a round every DECODE_SLACK steps inside the timed steps), graphs on
  and off;
- transformers (sdpa) decode tokens/s on the same shapes, full cache: batch of one at each context, and
  the batch of many;
- prefill attention: kvx's Triton kernel writing the row log-sum-exp plus the window statistics, against
  torch SDPA (flash) alone, at 8k and 32k.

Run from the repository root:  python3 benchmarks/gpu_decode.py --out results.json
Smoke-run on a CPU with tiny shapes (not a result):  python3 benchmarks/gpu_decode.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvx.eval.bench import hf_decode_tps, kvx_decode_tps  # noqa: E402
from kvx.eval.bench import kvx_batch_decode_tps as batch_decode_tps  # noqa: E402
from kvx.eval.hf_cache import cache_arg, cache_of  # noqa: E402
from kvx.kernels import ops  # noqa: E402
from kvx.models.config import ModelConfig  # noqa: E402
from kvx.models.transformer import Transformer  # noqa: E402
from kvx.policies import build_policy, parse_budget  # noqa: E402
from kvx.runtime.engine.batch_engine import BatchEngine, generate  # noqa: E402
from kvx.runtime.engine.model_runner import ModelRunner  # noqa: E402
from kvx.runtime.memory import parameter_count  # noqa: E402
from kvx.runtime.cache.pool import DEFAULT_BLOCK_SIZE, BlockPool  # noqa: E402
from kvx.runtime.engine.scheduler import worst_case_blocks  # noqa: E402
from kvx.runtime.engine.sequence import GenerationRequest  # noqa: E402


class NullTokenizer:
    eos_token_ids: list[int] = []

    def decode(self, ids, skip_special_tokens=False):
        return ""

    def stream_decoder(self):
        raise NotImplementedError


def llama_config(**over) -> ModelConfig:
    base = dict(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0, rope_scaling=None,
                rms_norm_eps=1e-5, tie_word_embeddings=False, qkv_bias=False, qk_norm=False, sliding_window=None,
                max_position_embeddings=131072, bos_token_id=1, eos_token_ids=[], torch_dtype="bfloat16")
    base.update(over)
    return ModelConfig(**base)


def tiny_config(**over) -> ModelConfig:
    """A few-kilobyte Llama for CPU smoke runs of the benchmarks' logic."""
    return llama_config(**{**dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                  num_kv_heads=2, head_dim=16, max_position_embeddings=8192), **over})


def default_model_config() -> ModelConfig:
    """SmolLM2-135M's shapes (the default model), float32."""
    return llama_config(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                        num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True,
                        max_position_embeddings=8192, torch_dtype="float32")


def random_state(cfg: ModelConfig, device, dtype, std: float = 0.02, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    D, H, Hkv, d, I, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          cfg.intermediate_size, cfg.vocab_size)

    def rnd(*shape, s=std):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * s).to(dtype)

    state = {"model.embed_tokens.weight": rnd(V, D, s=1.0), "model.norm.weight": torch.ones(D, device=device, dtype=dtype)}
    state["lm_head.weight"] = state["model.embed_tokens.weight"] if cfg.tie_word_embeddings else rnd(V, D)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = torch.ones(D, device=device, dtype=dtype)
        state[p + "post_attention_layernorm.weight"] = torch.ones(D, device=device, dtype=dtype)
        state[p + "self_attn.q_proj.weight"] = rnd(H * d, D)
        state[p + "self_attn.k_proj.weight"] = rnd(Hkv * d, D)
        state[p + "self_attn.v_proj.weight"] = rnd(Hkv * d, D)
        state[p + "self_attn.o_proj.weight"] = rnd(D, H * d)
        state[p + "mlp.gate_proj.weight"] = rnd(I, D)
        state[p + "mlp.up_proj.weight"] = rnd(I, D)
        state[p + "mlp.down_proj.weight"] = rnd(D, I)
    return state


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int = 10, warmup: int = 2, device="cuda") -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def copy_bandwidth(device, nbytes: int) -> float:
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    s = timed(lambda: y.copy_(x), repeats=10, device=device)
    x = y = None  # free them before what comes next
    return 2 * nbytes / s


def prefill_attention(n: int, cfg: ModelConfig, device, results: list) -> None:
    H, Hkv, d, w = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 32
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    q = torch.randn(H, n, d, device=device, dtype=dtype)
    k = torch.randn(Hkv, n, d, device=device, dtype=dtype)
    v = torch.randn(Hkv, n, d, device=device, dtype=dtype)
    pos = torch.arange(n, device=device)
    scale = d ** -0.5

    def kvx_attn():
        out, lse = ops.attention(q, k, v, pos, pos, scale, None, need_lse=True)
        ops.window_stats(q[:, -w:], k, pos[-w:], pos, lse[:, -w:], scale, None, want_sq=True)

    def sdpa():
        F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)

    t_kvx, t_sdpa = timed(kvx_attn, 5, device=device), timed(sdpa, 5, device=device)
    flops = 4 * H * n * n * d / 2
    results.append({"bench": "prefill_attention", "context": n, "kvx_ms": 1e3 * t_kvx, "sdpa_ms": 1e3 * t_sdpa,
                    "kvx_tflops": flops / t_kvx / 1e12, "sdpa_tflops": flops / t_sdpa / 1e12,
                    "ratio_vs_sdpa": t_sdpa / t_kvx})
    print(results[-1], flush=True)


def _spec(policy: str | None, budget: str | None):
    return (build_policy(policy) if policy else None), (parse_budget(budget) if budget else None)


def lone_pool(engine: ModelRunner, prompts: list[list[int]], max_tokens: int, policy: str | None,
              budget: str | None) -> BlockPool:
    """A pool holding every prompt's request at its worst case at once (the scheduler's own arithmetic)."""
    cfg = engine.config
    blocks = sum(worst_case_blocks(cfg, DEFAULT_BLOCK_SIZE, len(p), 0, max_tokens, *_spec(policy, budget))
                 for p in prompts)
    return BlockPool(blocks, DEFAULT_BLOCK_SIZE, cfg.head_dim, engine.dtype, engine.device)


def alone_tokens(engine: ModelRunner, ids: list[int], max_tokens: int, policy: str | None, budget: str | None) -> list[int]:
    """Greedy tokens of one prompt alone: kvx.runtime.engine.batch_engine.generate, what `kvx generate` runs."""
    pol, bud = _spec(policy, budget)
    return list(generate(engine, ids, max_tokens=max_tokens, policy=pol, budget=bud, stop_at_eos=False).token_ids)


def batch_tokens(engine: ModelRunner, prompts: list[list[int]], max_tokens: int, policy: str | None,
                 budget: str | None) -> list[list[int]]:
    """Greedy tokens of every prompt, all in one batch (every block back to the pool afterwards)."""
    batch = BatchEngine(engine, pool=lone_pool(engine, prompts, max_tokens, policy, budget), max_batch=len(prompts))
    seqs = []
    for p in prompts:  # a policy object each, as each request of a real batch has
        pol, bud = _spec(policy, budget)
        seqs.append(batch.submit(GenerationRequest(prompt_ids=p, max_tokens=max_tokens, stop_at_eos=False,
                                                   policy=pol, budget=bud)))
    batch.run()
    errors = [s.error for s in seqs if s.error is not None]
    assert not errors and batch.pool.num_used == 0, errors
    return [list(s.results[0].token_ids) for s in seqs]


def _same(want: list[int], got: list[int]) -> dict:
    same = next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), min(len(want), len(got)))
    return {"tokens": len(want), "identical_prefix": same, "all_equal": want == got}


def hf_config(cfg: ModelConfig):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                       max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
                       rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings)


def hf_model(cfg: ModelConfig, device, dtype, state: dict | None = None):
    """transformers' Llama (sdpa) of these shapes, built in `dtype` on `device`: its own random weights, or
    `state` (kvx's names are HF's)."""
    from transformers import LlamaForCausalLM

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype: an 8B model never exists in float32
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(hf_config(cfg)).eval()
    finally:
        torch.set_default_dtype(default)
    if state is not None:
        missing, unexpected = hf.load_state_dict(state, strict=False)
        assert not unexpected and not [k for k in missing if k != "lm_head.weight"], (missing, unexpected)
    hf.config._attn_implementation = "sdpa"
    return hf


def tokens_match(device, tiny: bool, results: list, save) -> None:
    """Greedy tokens in float32 on `device` against the CPU (random weights, default-model shapes): a batch of
    one and a batch of four, graphs on and off, three policies; then transformers on `device` against
    kvx's batch of one, full cache."""
    cfg = tiny_config(torch_dtype="float32") if tiny else default_model_config()
    state = random_state(cfg, "cpu", torch.float32, std=0.08, seed=1)
    g = torch.Generator().manual_seed(0)
    lengths = (90, 60, 75, 40) if tiny else (700, 520, 610, 330)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    steps = 12 if tiny else 48
    cpu = Transformer(cfg, dict(state))  # (the constructor empties the dict it is given)
    model = Transformer(cfg, {k: v.to(device) for k, v in state.items()})
    full_alone = None
    for policy, budget in ((None, None), ("snapkv", "10%"), ("tova", "10%")):
        want_one = alone_tokens(ModelRunner(cpu, NullTokenizer()), prompts[0], steps, policy, budget)
        want_many = batch_tokens(ModelRunner(cpu, NullTokenizer()), prompts, steps, policy, budget)
        for graphs in (True, False):
            eng = ModelRunner(model, NullTokenizer(), use_graphs=graphs)
            one = alone_tokens(eng, prompts[0], steps, policy, budget)
            many = batch_tokens(eng, prompts, steps, policy, budget)
            if policy is None and graphs:
                full_alone = one
            results.append({"bench": "gpu_vs_cpu_float32", "device": str(device), "policy": policy or "full",
                            "budget": budget or "100%", "graphs": graphs, "batch": 1, **_same(want_one, one)})
            print(results[-1], flush=True)
            rows = [_same(w, m) for w, m in zip(want_many, many)]
            results.append({"bench": "gpu_vs_cpu_float32", "device": str(device), "policy": policy or "full",
                            "budget": budget or "100%", "graphs": graphs, "batch": len(prompts),
                            "all_equal": all(r["all_equal"] for r in rows),
                            "identical_prefix": [r["identical_prefix"] for r in rows],
                            "batch_equals_alone": many[0] == one})
            print(results[-1], flush=True)
        save()
    try:
        hf = hf_model(cfg, device, torch.float32, {k: v.to(device) for k, v in state.items()})
    except ImportError as exc:
        print(f"transformers: {exc}", flush=True)
        return
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompts[0]], device=device), max_new_tokens=steps, min_new_tokens=steps,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    theirs = out[0, len(prompts[0]):].tolist()
    results.append({"bench": "kvx_vs_transformers_float32", "device": str(device), "policy": "full",
                    **_same(theirs, full_alone)})
    print(results[-1], flush=True)
    save()
    del hf


def kvx_batch_decode_tps(engine: ModelRunner, prompts: list[list[int]], steps: int, policy: str | None,
                         budget: str | None) -> tuple[float, int]:
    """kvx.eval.bench's batch timer with this script's policy names: (tokens/s, most running)."""
    return batch_decode_tps(engine, prompts, steps, *_spec(policy, budget))


def hf_batch_decode_tps(hf, prompts: list[list[int]], steps: int) -> float:
    """transformers' decode tokens/s of a batch of equal-length prompts (no padding), one warm-up step."""
    x = torch.tensor(prompts, device=hf.device)
    with torch.inference_mode():
        key = cache_arg(hf)
        out = hf(x, use_cache=True, logits_to_keep=1)
        past, tok = cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
        out = hf(tok, **{key: past}, use_cache=True)
        past, tok = cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
        sync(hf.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = hf(tok, **{key: past}, use_cache=True)
            past, tok = cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
        sync(hf.device)
    return len(prompts) * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_results.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and contexts (a CPU smoke run of the logic)")
    ap.add_argument("--contexts", default=None, help="batch-of-one contexts (default 1024,8192,32768)")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps (default 32)")
    ap.add_argument("--batch", type=int, default=8, help="sequences in the batch-of-many rows")
    ap.add_argument("--batch-context", type=int, default=None, help="their prompt tokens (default 4096)")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    tiny = args.tiny
    contexts = [int(x) for x in (args.contexts or ("64,256" if tiny else "1024,8192,32768")).split(",")]
    steps = args.steps or (4 if tiny else 32)
    batch_context = args.batch_context or (128 if tiny else 4096)
    evict_context = 256 if tiny else 8192
    results: list[dict] = []

    def save() -> None:  # after every section, so a run cut off by its timeout keeps what it measured
        Path(args.out).write_text(json.dumps(results, indent=1))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    results.append({"bench": "device", "name": name, "torch": torch.__version__, "tiny": tiny})
    bw = copy_bandwidth(device, (64 << 20) if tiny else (2 << 30))
    results.append({"bench": "copy_bandwidth", "bytes_per_s": bw})
    print(results[-1], flush=True)
    tokens_match(device, tiny, results, save)
    save()

    cfg = tiny_config() if tiny else llama_config()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    nbytes = torch.empty((), dtype=dtype).element_size()
    model = Transformer(cfg, random_state(cfg, device, dtype))
    # transformers beside it (its own random weights: only speed is compared here), so that each kvx row
    # has its transformers row at once, whatever a timeout cuts off later.
    hf = None if args.skip_hf else hf_model(cfg, device, dtype)
    weight_bytes = parameter_count(cfg) * nbytes

    def row(**fields) -> None:
        results.append(fields)
        print(fields, flush=True)
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def alone(n: int, budget: str | None) -> None:
        """A batch of one (what `kvx generate` runs), graphs on and off, then transformers (full cache)."""
        ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        for graphs in (True, False):
            pol, bud = _spec("snapkv" if budget else None, budget)
            tps = kvx_decode_tps(ModelRunner(model, NullTokenizer(), use_graphs=graphs), ids, steps, policy=pol, budget=bud)
            kept = n if bud is None else bud.total_entries(n, cfg.num_layers, cfg.num_kv_heads) / (cfg.num_layers * cfg.num_kv_heads)
            kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * nbytes * kept
            achieved = (weight_bytes + kv_bytes) * tps
            row(bench="kvx_decode", batch=1, context=n, budget=budget or "100%", graphs=graphs, tokens_per_s=tps,
                weights_plus_kv_bytes=weight_bytes + kv_bytes, achieved_bytes_per_s=achieved,
                fraction_of_copy=achieved / bw)
        if hf is not None and budget is None:
            row(bench="hf_decode", batch=1, context=n, budget="100%", tokens_per_s=hf_decode_tps(hf, ids, steps))

    # A batch of many: --batch sequences decoding together over one pool (one weight pass per step).
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, cfg.vocab_size, (batch_context,), generator=g).tolist() for _ in range(args.batch)]

    def many(budget: str | None) -> None:
        for graphs in (True, False):
            eng = ModelRunner(model, NullTokenizer(), use_graphs=graphs)
            tps, running = kvx_batch_decode_tps(eng, prompts, steps, "snapkv" if budget else None, budget)
            row(bench="kvx_decode", batch=args.batch, context=batch_context, budget=budget or "100%", graphs=graphs,
                tokens_per_s=tps, max_running=running)
        if hf is not None and budget is None:
            row(bench="hf_decode", batch=args.batch, context=batch_context, budget="100%",
                tokens_per_s=hf_batch_decode_tps(hf, prompts, steps))

    for n in contexts:
        alone(n, None)
    many(None)
    for n in contexts:
        alone(n, "5%")
    many("5%")
    hf = None
    # Decode-time eviction (TOVA 5%: an eviction round every DECODE_SLACK steps inside the timed steps),
    # graphs on / off: the captured step replays through the rounds.
    ids = torch.randint(0, cfg.vocab_size, (evict_context,), generator=torch.Generator().manual_seed(1)).tolist()
    for graphs in (True, False):
        eng = ModelRunner(model, NullTokenizer(), use_graphs=graphs)
        tps = kvx_decode_tps(eng, ids, max(steps, 48), policy=build_policy("tova"), budget=parse_budget("5%"))
        row(bench="kvx_decode_evicting", batch=1, policy="tova", context=evict_context, budget="5%", graphs=graphs,
            tokens_per_s=tps)
    model = eng = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for n in ((256,) if tiny else (8192, 32768)):
        prefill_attention(n, cfg, device, results)
        save()


if __name__ == "__main__":
    main()

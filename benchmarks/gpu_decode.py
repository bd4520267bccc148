"""GPU benchmark: batch-1 decode on Llama-3.1-8B shapes (random bf16 weights), kvx vs transformers.

Measures, in one run on one device:
- a device-to-device copy (bytes read + written per second): the bandwidth ceiling;
- kvx decode tokens/s at 1k, 8k, 32k context, full cache and a 5% budget (SnapKV), with and without
  CUDA graphs, and the achieved bandwidth (weights + KV bytes actually read per step) / copy bandwidth;
- the same with decode-time eviction (TOVA 5% at 8k), graphs on and off;
- transformers (sdpa) decode tokens/s on the same shapes, full cache;
- prefill attention: kvx's Triton kernel writing the row log-sum-exp plus the window statistics, against
  torch SDPA (flash) alone, at 8k and 32k;
- a float32 generation on the GPU against the CPU reference, token for token (default-model shapes).

Run from the repository root:  python3 benchmarks/gpu_decode.py --out results.json
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
from kvx.kernels import ops  # noqa: E402
from kvx.models.config import ModelConfig  # noqa: E402
from kvx.models.transformer import Transformer  # noqa: E402
from kvx.policies import build_policy, parse_budget  # noqa: E402
from kvx.runtime.engine import Engine  # noqa: E402
from kvx.runtime.memory import parameter_count  # noqa: E402


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


def timed(fn, repeats: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def copy_bandwidth() -> float:
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    s = timed(lambda: y.copy_(x), repeats=10)
    del x, y
    return 2 * 2 * 1024**3 / s


def prefill_attention(n: int, results: list) -> None:
    H, Hkv, d, w = 32, 8, 128, 32
    q = torch.randn(H, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(Hkv, n, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(Hkv, n, d, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(n, device="cuda")
    scale = d ** -0.5

    def kvx_attn():
        out, lse = ops.attention(q, k, v, pos, pos, scale, None, need_lse=True)
        ops.window_stats(q[:, -w:], k, pos[-w:], pos, lse[:, -w:], scale, None, want_sq=True)

    def sdpa():
        F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)

    t_kvx, t_sdpa = timed(kvx_attn, 5), timed(sdpa, 5)
    flops = 4 * H * n * n * d / 2
    results.append({"bench": "prefill_attention", "context": n, "kvx_ms": 1e3 * t_kvx, "sdpa_ms": 1e3 * t_sdpa,
                    "kvx_tflops": flops / t_kvx / 1e12, "sdpa_tflops": flops / t_sdpa / 1e12,
                    "ratio_vs_sdpa": t_sdpa / t_kvx})
    print(results[-1], flush=True)


def gpu_matches_cpu(results: list) -> None:
    """Default-model shapes, random float32 weights: greedy tokens on the GPU equal the CPU reference."""
    cfg = llama_config(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                       num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True,
                       max_position_embeddings=8192, torch_dtype="float32")
    state = random_state(cfg, "cpu", torch.float32, std=0.08, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (700,), generator=torch.Generator().manual_seed(0)).tolist()
    out = {}
    for dev in ("cpu", "cuda"):
        model = Transformer(cfg, {k: v.to(dev) for k, v in state.items()})
        for pol, bud in ((None, None), ("snapkv", "10%")):
            eng = Engine(model, NullTokenizer(), build_policy(pol) if pol else None, parse_budget(bud) if bud else None)
            out[(dev, pol)] = eng.generate(ids, max_tokens=48).token_ids
    for pol in (None, "snapkv"):
        a, b = out[("cpu", pol)], out[("cuda", pol)]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        results.append({"bench": "gpu_vs_cpu_float32", "policy": pol or "full", "tokens": len(a),
                        "identical_prefix": same, "all_equal": a == b})
        print(results[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_results.json")
    ap.add_argument("--contexts", default="1024,8192,32768")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    results: list[dict] = []

    def save() -> None:  # after every section, so a run cut off by its timeout keeps what it measured
        Path(args.out).write_text(json.dumps(results, indent=1))

    dev = torch.cuda.get_device_name()
    results.append({"bench": "device", "name": dev, "torch": torch.__version__})
    bw = copy_bandwidth()
    results.append({"bench": "copy_bandwidth", "bytes_per_s": bw})
    print(results[-1], flush=True)
    for n in (8192, 32768):
        prefill_attention(n, results)
    gpu_matches_cpu(results)
    save()

    cfg = llama_config()
    model = Transformer(cfg, random_state(cfg, "cuda", torch.bfloat16))
    weight_bytes = parameter_count(cfg) * 2
    contexts = [int(x) for x in args.contexts.split(",")]
    for n in contexts:
        ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        for budget in (None, "5%"):
            for graphs in (True, False):
                eng = Engine(model, NullTokenizer(), use_graphs=graphs)
                pol = build_policy("snapkv") if budget else None
                bud = parse_budget(budget) if budget else None
                tps = kvx_decode_tps(eng, ids, args.steps, policy=pol, budget=bud)
                kept = n if bud is None else bud.total_entries(n, cfg.num_layers, cfg.num_kv_heads) / (cfg.num_layers * cfg.num_kv_heads)
                kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * kept
                achieved = (weight_bytes + kv_bytes) * tps
                results.append({"bench": "kvx_decode", "context": n, "budget": budget or "100%", "graphs": graphs,
                                "tokens_per_s": tps, "weights_plus_kv_bytes": weight_bytes + kv_bytes,
                                "achieved_bytes_per_s": achieved, "fraction_of_copy": achieved / bw})
                print(results[-1], flush=True)
                save()
                torch.cuda.empty_cache()
    # Decode-time eviction (TOVA 5% at 8k: an eviction round every DECODE_SLACK steps inside the timed
    # steps), graphs on / off: the single-sequence graph now replays through the rounds.
    ids = torch.randint(0, cfg.vocab_size, (8192,), generator=torch.Generator().manual_seed(1)).tolist()
    for graphs in (True, False):
        eng = Engine(model, NullTokenizer(), use_graphs=graphs)
        tps = kvx_decode_tps(eng, ids, max(args.steps, 48), policy=build_policy("tova"), budget=parse_budget("5%"))
        results.append({"bench": "kvx_decode_evicting", "policy": "tova", "context": 8192, "budget": "5%",
                        "graphs": graphs, "tokens_per_s": tps})
        print(results[-1], flush=True)
        save()
    del model
    torch.cuda.empty_cache()
    if not args.skip_hf:
        from transformers import LlamaConfig, LlamaForCausalLM

        hcfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                           rope_theta=500000.0, rms_norm_eps=1e-5)
        with torch.device("cuda"):
            hf = LlamaForCausalLM(hcfg).to(torch.bfloat16).eval()
        hf.config._attn_implementation = "sdpa"
        for n in contexts:
            ids = torch.randint(0, hcfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            tps = hf_decode_tps(hf, ids, args.steps)
            results.append({"bench": "hf_decode", "context": n, "budget": "100%", "tokens_per_s": tps})
            print(results[-1], flush=True)
    save()


if __name__ == "__main__":
    main()

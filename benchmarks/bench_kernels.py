"""Timings of the Triton kernels on a CUDA GPU (numbers for docs/benchmarks.md).

    python3 benchmarks/bench_kernels.py [--sweep]

Prefill attention vs torch SDPA (bf16, H=32, Hkv=8, d=128, causal) at 8k and 32k; ragged decode bandwidth
at 32k tokens per kv head; window statistics at 32k. --sweep also times a few tile configurations.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from kvx.kernels import triton_attention, triton_decode, triton_stats

H, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16


def _ms(fn) -> float:
    """Best of two do_bench runs (the first run after a pause can catch the GPU at a low clock)."""
    return min(do_bench(fn, warmup=25, rep=100) for _ in range(2))


def _graphed(fn):
    """fn captured in a CUDA graph (after one warm-up call); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_prefill(n: int, sweep: bool) -> None:
    q = torch.randn(H, n, D, device="cuda", dtype=DTYPE)
    k = torch.randn(HKV, n, D, device="cuda", dtype=DTYPE)
    v = torch.randn(HKV, n, D, device="cuda", dtype=DTYPE)
    pos = torch.arange(n, device="cuda")
    scale = D ** -0.5
    flops = 4 * H * n * n * D / 2  # causal: half the square
    tflops = lambda ms: flops / ms / 1e9  # noqa: E731

    def sdpa_gqa():
        F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale, enable_gqa=True)

    ke, ve = k.repeat_interleave(H // HKV, 0)[None], v.repeat_interleave(H // HKV, 0)[None]

    def sdpa_expanded():
        F.scaled_dot_product_attention(q[None], ke, ve, is_causal=True, scale=scale)

    rows = {
        "triton": lambda: triton_attention.attention(q, k, v, pos, pos, scale),
        "triton +lse": lambda: triton_attention.attention(q, k, v, pos, pos, scale, need_lse=True),
        "triton window 4096": lambda: triton_attention.attention(q, k, v, pos, pos, scale, 4096),
        "sdpa enable_gqa": sdpa_gqa,
        "sdpa expanded kv": sdpa_expanded,
    }
    if sweep:
        for cfg in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                    (128, 64, 8, 4)]:
            rows[f"triton {cfg}"] = lambda cfg=cfg: triton_attention.attention(q, k, v, pos, pos, scale, blocks=cfg)
    for name, fn in rows.items():
        ms = _ms(fn)
        print(f"prefill n={n:6d} {name:28s} {ms:9.3f} ms  {tflops(ms):7.1f} TFLOP/s (causal)")
    del ke, ve


def bench_decode(n: int, sweep: bool) -> None:
    slots = HKV * n
    k_pool = torch.randn(slots, D, device="cuda", dtype=DTYPE)
    v_pool = torch.randn(slots, D, device="cuda", dtype=DTYPE)
    q = torch.randn(H, D, device="cuda", dtype=DTYPE)
    seg_start = torch.arange(HKV, device="cuda", dtype=torch.int32) * n
    full = torch.full((HKV,), n, device="cuda", dtype=torch.int32)
    ragged = torch.randint(n // 8, n, (HKV,), device="cuda", dtype=torch.int32)
    mass = torch.zeros(slots, device="cuda")
    scale = D ** -0.5

    def bw(ms, lens):
        return float(lens.sum()) * D * 2 * 2 / ms / 1e6  # K and V bytes read, GB/s

    cases = {
        "uniform": (full, None, {}),
        "uniform +key_mass": (full, mass, {}),
        "ragged": (ragged, None, {}),
    }
    if sweep:
        for blocks in [(64, 4, 3), (64, 8, 3), (128, 8, 3), (64, 8, 4), (32, 4, 4)]:
            for chunk in (512, 1024, 2048):
                cases[f"uniform {blocks} chunk={chunk}"] = (full, None, {"blocks": blocks, "chunk": chunk})
    for name, (lens, km, kw) in cases.items():
        ms = _ms(lambda: triton_decode.decode_attention(q, k_pool, v_pool, seg_start, lens, scale, km, n, **kw))
        print(f"decode  n={n:6d} {name:36s} {ms * 1e3:8.1f} us  {bw(ms, lens):7.0f} GB/s")
    for name, lens, km in (("graph uniform", full, None), ("graph ragged +key_mass", ragged, mass)):
        replay = _graphed(lambda: triton_decode.decode_attention(q, k_pool, v_pool, seg_start, lens, scale, km, n))
        ms = _ms(replay)
        print(f"decode  n={n:6d} {name:36s} {ms * 1e3:8.1f} us  {bw(ms, lens):7.0f} GB/s")
    kd, vd = k_pool.view(HKV, n, D)[None], v_pool.view(HKV, n, D)[None]
    ms = _ms(lambda: F.scaled_dot_product_attention(q[None, :, None], kd, vd, scale=scale, enable_gqa=True))
    print(f"decode  n={n:6d} {'sdpa dense enable_gqa':36s} {ms * 1e3:8.1f} us  {bw(ms, full):7.0f} GB/s")


def bench_stats(n: int) -> None:
    q = torch.randn(H, n, D, device="cuda", dtype=DTYPE)
    k = torch.randn(HKV, n, D, device="cuda", dtype=DTYPE)
    v = torch.randn(HKV, n, D, device="cuda", dtype=DTYPE)
    pos = torch.arange(n, device="cuda")
    scale = D ** -0.5
    _, lse = triton_attention.attention(q, k, v, pos, pos, scale, need_lse=True)
    for w in (1, 32, 64):
        ms = _ms(lambda: triton_stats.window_stats(q[:, -w:], k, pos[-w:], pos, lse[:, -w:], scale, None, True))
        print(f"stats   n={n:6d} window_stats w={w:<3d} (+sq)          {ms * 1e3:8.1f} us")
    ms = _ms(lambda: triton_stats.sg_colsum(q[:, -32:], k, pos[-32:], pos, 1024, scale, None))
    print(f"stats   n={n:6d} sg_colsum r=32                      {ms * 1e3:8.1f} us")
    if n <= 8192:
        ms = _ms(lambda: triton_stats.window_stats(q, k, pos, pos, lse, scale, None, False))
        print(f"stats   n={n:6d} colsum over all rows                {ms * 1e3:8.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    x = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    for _ in range(200):  # bring the clocks up before the first timing
        x @ x
    torch.cuda.synchronize()
    for n in (8192, 32768):
        bench_prefill(n, args.sweep and n == 8192)
    bench_decode(32768, args.sweep)
    bench_stats(8192)
    bench_stats(32768)


if __name__ == "__main__":
    main()

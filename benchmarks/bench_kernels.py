"""Timings of the Triton kernels on a CUDA GPU (numbers for docs/benchmarks.md).

    python3 benchmarks/bench_kernels.py [--sweep] [--paged]

Prefill attention vs torch SDPA (bf16, H=32, Hkv=8, d=128, causal) at 8k and 32k; ragged decode bandwidth
at 32k tokens per kv head; window statistics at 32k. --sweep also times a few tile configurations.
--paged times only the batched engine's paged decode kernel against the contiguous ragged kernel on the
same keys, at the batches of benchmarks/gpu_batch.py: (b) 2 sequences x 32k, (c) 21 and 64 sequences x
1638 (5% of 32k); blocks of 32 in a shuffled table, as a pool that has served many requests holds them;
key tiles of 1 (the engine's), 2 and 4 blocks; 4x and 16x the launchers' split programs (both give
each segment one program once a batch has more than 128 segments).
Smoke-run of --paged's setup and its equality check on a CPU:
    TRITON_INTERPRET=1 python3 benchmarks/bench_kernels.py --paged --tiny
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from kvx.kernels import triton_attention, triton_decode, triton_paged, triton_stats

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


def paged_case(seqs: int, n: int, device: str, block: int = 32, hkv: int = HKV, group: int = H // HKV,
               d: int = D, dtype=DTYPE):
    """Callables for one batch of `seqs` sequences with n keys per kv head: the paged kernel (without and
    with TOVA's mass written), and the contiguous ragged kernel over the same keys; plus the bytes read."""
    segs, per_seg = seqs * hkv, -(-n // block)
    blocks = segs * per_seg
    gen = torch.Generator().manual_seed(seqs * 100003 + n)
    k = torch.randn(blocks, block, d, generator=gen).to(device, dtype)
    v = torch.randn(blocks, block, d, generator=gen).to(device, dtype)
    q = torch.randn(segs, group, d, generator=gen).to(device, dtype)
    tables = torch.randperm(blocks, generator=gen).to(device, torch.int32).view(segs, per_seg)
    lengths = torch.full((segs,), n, device=device, dtype=torch.int32)
    mass = torch.zeros(blocks, block, device=device)
    mode = torch.full((segs,), 2, device=device, dtype=torch.int32)
    scale = d ** -0.5
    # the same keys laid out contiguously, segment after segment, for the ragged kernel
    order = tables.long().view(-1)
    k_flat, v_flat = k[order].reshape(-1, d), v[order].reshape(-1, d)
    seg_start = torch.arange(segs, device=device, dtype=torch.int32) * (per_seg * block)
    q_flat = q.reshape(segs * group, d)

    def paged():
        return triton_paged.paged_decode_attention(q, k, v, tables, lengths, scale, max_len=per_seg * block)

    def paged_mass():
        return triton_paged.paged_decode_attention(q, k, v, tables, lengths, scale, mass_pool=mass,
                                                   mass_mode=mode, max_len=per_seg * block)

    def contiguous():
        return triton_decode.decode_attention(q_flat, k_flat, v_flat, seg_start, lengths, scale, None, n)

    def paged_tiles(tile_blocks):
        return lambda: triton_paged.paged_decode_attention(q, k, v, tables, lengths, scale, max_len=per_seg * block,
                                                           tile_blocks=tile_blocks)

    # Both launchers aim at TARGET_PROGRAMS split programs in all: one per segment once the batch has more
    # than half that many segments (168 at 21 x 8 kv heads), fewer warps than a 132-SM chip can keep busy. More
    # splits (a smaller chunk of keys per program) show whether the grid, not the kernel, holds a batch back.
    default_splits = max(1, triton_decode.TARGET_PROGRAMS // segs)

    def chunk_for(factor):
        return max(block, -(-per_seg * block // (default_splits * factor)))

    def paged_split(factor):
        return lambda: triton_paged.paged_decode_attention(q, k, v, tables, lengths, scale, max_len=per_seg * block,
                                                           chunk=chunk_for(factor))

    def contiguous_split(factor):
        return lambda: triton_decode.decode_attention(q_flat, k_flat, v_flat, seg_start, lengths, scale, None, n,
                                                      chunk=chunk_for(factor))

    fns = {"paged": paged, "paged +mass": paged_mass, "contiguous": contiguous}
    fns.update({f"paged, {t} blocks a tile": paged_tiles(t) for t in (2, 4)})
    fns.update({f"paged, splits x{f}": paged_split(f) for f in (4, 16)})
    fns["contiguous, splits x4"] = contiguous_split(4)
    return fns, segs * n * d * 2 * 2


def bench_paged(tiny: bool) -> None:
    shapes = [(2, 96), (3, 40)] if tiny else [(2, 32768), (21, 1638), (64, 1638)]
    for seqs, n in shapes:
        device = "cpu" if tiny else "cuda"
        kw = dict(hkv=2, group=3, d=32, dtype=torch.float32) if tiny else {}
        fns, nbytes = paged_case(seqs, n, device, **kw)
        reference = fns["contiguous"]().float().reshape(-1)
        for name in (name for name in fns if name != "contiguous"):
            got = fns[name]().float().reshape(-1)
            err = (got - reference).abs().max().item()
            assert err < (1e-4 if tiny else 2e-2), f"{name} differs from the contiguous kernel by {err}"
        if tiny:
            checked = "; ".join(name for name in fns if name != "contiguous")
            print(f"paged   {seqs} seqs x {n}: paged = contiguous for {checked} (smoke run, nothing timed)")
            continue
        for name, fn in fns.items():
            ms = _ms(_graphed(fn))
            print(f"paged   {seqs:3d} seqs x {n:6d} {name:24s} graph {ms * 1e3:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--paged", action="store_true", help="only the paged decode kernel vs the contiguous one")
    parser.add_argument("--tiny", action="store_true", help="with --paged: tiny shapes on the CPU, no timing")
    args = parser.parse_args()
    if args.paged and args.tiny:
        bench_paged(tiny=True)
        return
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    x = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    for _ in range(200):  # bring the clocks up before the first timing
        x @ x
    torch.cuda.synchronize()
    if args.paged:
        bench_paged(tiny=False)
        return
    for n in (8192, 32768):
        bench_prefill(n, args.sweep and n == 8192)
    bench_decode(32768, args.sweep)
    bench_stats(8192)
    bench_stats(32768)


if __name__ == "__main__":
    main()

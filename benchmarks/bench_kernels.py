"""Timings of the Triton kernels on a CUDA GPU (numbers for docs/benchmarks.md).

    python3 benchmarks/bench_kernels.py [--sweep] [--paged]

Prefill attention vs torch SDPA (bf16, H=32, Hkv=8, d=128, causal) at 8k and 32k; window statistics at 8k
and 32k. --sweep also times a few prefill tile configurations.
--paged times only the engine's decode attention, the paged kernel, against torch SDPA over the same keys
laid out contiguously (a dense [N, 1, L, d] per (sequence, kv head) segment, its G query heads as
[N, G, 1, d], enable_gqa): SDPA checks what the kernel computes and is the bandwidth reference. At the
batches of benchmarks/gpu_batch.py: (b) 2 sequences x 32k, (c) 21 and 64 sequences x 1638 (5% of 32k);
blocks of 32 in a shuffled table, as a pool that has served many requests holds them; key tiles of 1
(the engine's), 2 and 4 blocks; 4x and 16x the launcher's split programs (triton_combine.TARGET_PROGRAMS
in all: one per segment once a batch has more than half that many segments).
Smoke-run of --paged's setup and its equality check on a CPU (SDPA on CPU tensors):
    TRITON_INTERPRET=1 python3 benchmarks/bench_kernels.py --paged --tiny
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from kvx.kernels import triton_attention, triton_paged, triton_stats
from kvx.kernels.triton_combine import TARGET_PROGRAMS

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
    with TOVA's mass written, larger key tiles, more split programs) and torch SDPA over the same keys laid
    out contiguously, each returning [segments, group, d]; the K and V bytes a pass reads; and a check of
    the mass the "+mass" variant wrote."""
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
    max_len = per_seg * block
    # The same keys laid out contiguously for SDPA: segment after segment, each its n keys as one kv head
    # [N, 1, n, d]; its group of query heads [N, G, 1, d].
    order = tables.long()
    k_dense = k[order].reshape(segs, max_len, d)[:, None, :n].contiguous()
    v_dense = v[order].reshape(segs, max_len, d)[:, None, :n].contiguous()
    q_dense = q[:, :, None].contiguous()

    def sdpa():
        out = F.scaled_dot_product_attention(q_dense, k_dense, v_dense, scale=scale, enable_gqa=True)
        return out.reshape(segs, group, d)

    def paged(**kw):
        return lambda: triton_paged.paged_decode_attention(q, k, v, tables, lengths, scale, max_len=max_len, **kw)

    # The launcher aims at TARGET_PROGRAMS split programs in all: one per segment once the batch has more
    # than half that many segments (168 at 21 x 8 kv heads), fewer warps than a 132-SM chip can keep busy.
    # More splits (a smaller chunk of keys per program) show whether the grid, not the kernel, holds a batch
    # back.
    default_splits = max(1, TARGET_PROGRAMS // segs)

    def chunk_for(factor):
        return max(block, -(-max_len // (default_splits * factor)))

    def mass_error() -> float:
        """What "paged +mass" last wrote (mode 2: each key's probability summed over the group): every
        segment's mass sums to G; the largest miss."""
        return (mass[order].sum((1, 2)) - group).abs().max().item()

    fns = {"sdpa dense": sdpa, "paged": paged(), "paged +mass": paged(mass_pool=mass, mass_mode=mode)}
    fns.update({f"paged, {t} blocks a tile": paged(tile_blocks=t) for t in (2, 4)})
    fns.update({f"paged, splits x{f}": paged(chunk=chunk_for(f)) for f in (4, 16)})
    return fns, segs * n * d * 2 * torch.empty((), dtype=dtype).element_size(), mass_error


def bench_paged(tiny: bool) -> None:
    shapes = [(2, 96), (3, 40)] if tiny else [(2, 32768), (21, 1638), (64, 1638)]
    for seqs, n in shapes:
        device = "cpu" if tiny else "cuda"
        kw = dict(hkv=2, group=3, d=32, dtype=torch.float32) if tiny else {}
        fns, nbytes, mass_error = paged_case(seqs, n, device, **kw)
        reference = fns["sdpa dense"]().float()
        checked = [name for name in fns if name != "sdpa dense"]
        for name in checked:
            err = (fns[name]().float() - reference).abs().max().item()
            assert err < (1e-4 if tiny else 2e-2), f"{name} differs from SDPA by {err}"
        err = mass_error()
        assert err < (1e-3 if tiny else 2e-2), f"paged +mass: a segment's mass is off its group size by {err}"
        if tiny:
            print(f"paged   {seqs} seqs x {n}: paged = sdpa for {'; '.join(checked)} (smoke run, nothing timed)")
            continue
        for name, fn in fns.items():
            ms = _ms(_graphed(fn))
            print(f"paged   {seqs:3d} seqs x {n:6d} {name:24s} graph {ms * 1e3:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--paged", action="store_true", help="only the paged decode kernel vs torch SDPA on the same keys")
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
    bench_stats(8192)
    bench_stats(32768)


if __name__ == "__main__":
    main()

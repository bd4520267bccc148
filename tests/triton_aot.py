"""Compile every Triton kernel for a real GPU without one: ahead of time, for sm_90 (H100/H200) by default.

The interpreter (TRITON_INTERPRET=1) checks what a kernel computes but never compiles it, so a kernel can
pass every CPU test and still fail on the GPU: a type the compiler rejects, a tl.dot shape it cannot
lower, a tile that needs more shared memory than the chip has. This script runs the real launchers
(kvx.kernels.triton_*) on CPU tensors of the shapes the engine uses, with a stub driver that names the
target, and turns every launch into a compile (Triton IR -> PTX -> cubin with Triton's bundled ptxas);
nothing runs. It prints one JSON line per compiled variant (its shared memory, registers and local memory)
and exits 1 when a variant needs more shared memory than the target allows.

Run it as its own process, never under TRITON_INTERPRET=1 (the interpreter replaces the kernels):
    python tests/triton_aot.py [--arch 90] [--dtypes bf16,fp32] [--shapes all] [--full all]
Every variant of every shape and dtype takes about 7 minutes on 2 cores; compiled kernels are cached
(~/.triton/cache), so a second run takes seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Opt-in shared memory per block (bytes) by compute capability: what a launch may ask for.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass(frozen=True)
class Shape:
    """A model's attention shape: query heads, kv heads, head size (and a sliding window, if any)."""

    name: str
    heads: int
    kv_heads: int
    head_dim: int


SHAPES = [
    Shape("smollm2-135m", 9, 3, 64),  # the default model
    Shape("llama-3.1-8b", 32, 8, 128),  # the GPU benchmarks' shapes
    Shape("qwen2.5-7b", 28, 4, 128),  # a group of 7: BLOCK_G pads to 16
]


class CompileOnlyDriver:
    """What JITFunction.run (and kvx's launch settings) ask of the driver, answered without a device."""

    def __init__(self, target, shared_limit: int):
        self.target = target
        self.utils = self  # driver.utils.get_device_properties
        self.shared_limit = shared_limit

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": self.shared_limit}

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target


def install_compile_only(arch: int, compiled: list[dict]) -> None:
    """Every kernel launch from now on compiles for sm_<arch> and records the variant instead of running;
    launchers that size their tiles by the chip's shared memory see sm_<arch>'s."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", arch, 32), SHARED_LIMIT[arch]))
    original = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        began = time.perf_counter()
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        meta = kernel.metadata
        compiled.append({
            "kernel": self.fn.__name__, "module": self.fn.__module__.rsplit(".", 1)[-1],
            "constants": {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")},
            "num_warps": meta.num_warps, "num_stages": meta.num_stages, "shared": meta.shared,
            **resource_usage(kernel.asm["cubin"]),
            "seconds": round(time.perf_counter() - began, 2),  # ~0 when the kernel was in Triton's cache
        })
        return kernel

    JITFunction.run = compile_only


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and local memory per thread (bytes: register spills, or arrays the compiler
    could not keep in registers) of a compiled kernel, read by the cuobjdump Triton ships. Local memory
    in a decode or attention loop costs a round trip to L1/L2 per access, so it shows here before any GPU
    run would; {} when cuobjdump is missing."""
    from triton.backends.nvidia import compiler

    tool = Path(compiler.__file__).parent / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([str(tool), "-res-usage", file.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) .*?LOCAL:(\d+)", report)
    if not found:
        return {}
    registers, stack, local = map(int, found.groups())
    return {"registers": registers, "local": max(stack, local)}


def rand(*shape, dtype):
    return torch.randn(*shape).to(dtype)


def launch_prefill(shape: Shape, dtype, quick: bool) -> None:
    from kvx.kernels import triton_attention

    T = 300
    q = rand(shape.heads, T, shape.head_dim, dtype=dtype)
    k = rand(shape.kv_heads, T, shape.head_dim, dtype=dtype)
    pos = torch.arange(T)
    for window, need_lse in ([(None, True)] if quick else [(None, False), (None, True), (64, True)]):
        triton_attention.attention(q, k, k, pos, pos, 0.1, window, need_lse)


def launch_stats(shape: Shape, dtype, quick: bool) -> None:
    from kvx.kernels import triton_stats

    S, w = 300, 32
    q = rand(shape.heads, w, shape.head_dim, dtype=dtype)
    k = rand(shape.kv_heads, S, shape.head_dim, dtype=dtype)
    q_pos, k_pos = torch.arange(S - w, S), torch.arange(S)
    lse = torch.zeros(shape.heads, w)
    for window, want_sq in ([(None, True)] if quick else [(None, False), (None, True), (64, True)]):
        triton_stats.window_stats(q, k, q_pos, k_pos, lse, 0.1, window, want_sq)
    triton_stats.sg_colsum(q, k, q_pos, k_pos, 64, 0.1, None)
    triton_stats.column_max(q, k, q_pos, k_pos, lse, 0.1)


def launch_paged(shape: Shape, dtype, quick: bool) -> None:
    from kvx.kernels import triton_paged

    seqs, per_head = 3, 200
    segments = seqs * shape.kv_heads
    # (block size, blocks per key tile, with mass, sliding window)
    cases = [(16, 1, True, None)] if quick else [
        (16, 1, False, None), (16, 1, True, None), (16, 1, True, 64), (64, 1, True, None),
        (32, 2, False, None), (32, 4, False, None), (32, 4, True, 64)]
    for block, tile_blocks, with_mass, window in cases:
        blocks_per_seg = -(-per_head // block)
        pool_blocks = segments * blocks_per_seg
        k = rand(pool_blocks, block, shape.head_dim, dtype=dtype)
        tables = torch.arange(pool_blocks, dtype=torch.int32).view(segments, blocks_per_seg)
        lengths = torch.randint(0, per_head + 1, (segments,), dtype=torch.int32)
        q = rand(segments, shape.heads // shape.kv_heads, shape.head_dim, dtype=dtype)
        pos = torch.arange(pool_blocks * block, dtype=torch.int32).view(pool_blocks, block)
        q_pos = torch.full((segments,), per_head)
        mode = torch.ones(segments, dtype=torch.int32)
        mass = torch.zeros(pool_blocks, block) if with_mass else None
        triton_paged.paged_decode_attention(
            q, k, k, tables, lengths, 0.1, mass_pool=mass, mass_mode=mode if with_mass else None,
            pos_pool=pos, q_pos=q_pos, sliding_window=window, max_len=blocks_per_seg * block,
            tile_blocks=tile_blocks)


LAUNCHERS = {"prefill": launch_prefill, "stats": launch_stats, "paged": launch_paged}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma-separated: bf16, fp16, fp32")
    parser.add_argument("--shapes", default="all", help="comma-separated names from SHAPES, or all")
    parser.add_argument("--launchers", default="all", help=f"comma-separated from {list(LAUNCHERS)}, or all")
    parser.add_argument("--full", default="all",
                        help="shapes that get every variant (windows, mass, lse, block sizes), or all or none; "
                             "the others get one variant per kernel")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels this script compiles", file=sys.stderr)
        return 2
    names = [shape.name for shape in SHAPES]
    shapes = names if args.shapes == "all" else args.shapes.split(",")
    full = names if args.full == "all" else [] if args.full == "none" else args.full.split(",")
    launchers = list(LAUNCHERS) if args.launchers == "all" else args.launchers.split(",")
    unknown = sorted(set(shapes + full) - set(names)) + sorted(set(launchers) - set(LAUNCHERS))
    if args.arch not in SHARED_LIMIT or unknown:
        parser.error(f"unknown shape(s) or launcher(s) {unknown}" if unknown else f"--arch must be one of {sorted(SHARED_LIMIT)}")
    compiled: list[dict] = []
    install_compile_only(args.arch, compiled)
    limit = SHARED_LIMIT[args.arch]
    over = 0
    for dtype_name in args.dtypes.split(","):
        for shape in SHAPES:
            if shape.name not in shapes:
                continue
            for name in launchers:
                done = len(compiled)
                LAUNCHERS[name](shape, DTYPES[dtype_name], quick=shape.name not in full)
                for variant in compiled[done:]:
                    variant.update(dtype=dtype_name, shape=shape.name, arch=args.arch)
                    if variant["shared"] > limit:
                        variant["error"] = f"needs {variant['shared']} bytes of shared memory, sm_{args.arch} has {limit}"
                        over += 1
                    print(json.dumps(variant, default=str), flush=True)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())

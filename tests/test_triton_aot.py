"""Every Triton kernel compiles for Hopper (sm_90: H100/H200) with the launch settings the engine uses.

The interpreter tests check what the kernels compute; this one checks that the compiler accepts them,
without a GPU: tests/triton_aot.py runs the launchers on CPU tensors and compiles each launch down to a
cubin. It runs in its own process because the interpreter, switched on by other test modules, replaces
the kernels it compiles.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kvx" / "kernels"


def _nvidia_backend_present() -> bool:
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _nvidia_backend_present(), reason="Triton's CUDA backend is not installed")


def _defined_kernels() -> set[str]:
    """The @triton.jit functions that some launcher launches (`name[grid](...)`), not the helpers they call."""
    sources = [path.read_text() for path in KERNELS.glob("triton_*.py")]
    jitted = {name for text in sources for name in re.findall(r"@triton\.jit\s*\ndef (\w+)", text)}
    return {name for name in jitted if any(re.search(rf"\b{name}\[", text) for text in sources)}


def _compile(*args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when unset; 1 is what a GPU run uses
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_aot.py"), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    return run, [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def _assert_compiled(run: subprocess.CompletedProcess, variants: list[dict]) -> None:
    over = "\n".join(json.dumps(v) for v in variants if "error" in v)
    assert run.returncode == 0 and variants, run.stderr[-4000:] + over


def test_every_kernel_compiles_for_sm90_in_bf16_and_fp32():
    """bf16 (what a GPU run uses): every variant on Llama-3.1-8B's shapes (the GPU benchmarks'), one per
    kernel on the others; fp32 (the GPU-vs-CPU tests): one per kernel on the default model's shapes (fp32
    tiles compile slowly: ~15 s for one prefill variant on 2 cores)."""
    bf16_run, bf16 = _compile("--arch", "90", "--dtypes", "bf16", "--full", "llama-3.1-8b")
    _assert_compiled(bf16_run, bf16)
    fp32_run, fp32 = _compile("--arch", "90", "--dtypes", "fp32", "--shapes", "smollm2-135m", "--full", "none")
    _assert_compiled(fp32_run, fp32)
    variants = bf16 + fp32
    defined = _defined_kernels()
    # the regex still finds the kernels: prefill, row lse, column stats, column max, paged split, paged mass
    # and the split-K combine (triton_combine.py, launched by the paged launcher)
    assert len(defined) >= 7 and "_decode_combine_kernel" in defined, defined
    for dtype, shapes in (("bf16", ("smollm2-135m", "llama-3.1-8b", "qwen2.5-7b")), ("fp32", ("smollm2-135m",))):
        for shape in shapes:
            compiled = {v["kernel"] for v in variants if v["dtype"] == dtype and v["shape"] == shape}
            assert defined <= compiled, f"{dtype} {shape}: never compiled: {sorted(defined - compiled)}"
    assert all(0 <= v["shared"] <= 232448 for v in variants)
    # The bf16 kernels (what a GPU run uses) keep their loops in registers: no variant spills to local
    # memory beyond a few bytes of stack outside a loop (fp32 'ieee' tiles do spill, they serve only the
    # GPU-vs-CPU tests).
    assert all("registers" in v for v in bf16)  # cuobjdump read every cubin
    spilled = [v for v in bf16 if v["local"] > 16]
    assert not spilled, "\n".join(json.dumps(v) for v in spilled)
    # the sliding-window and attention-mass variants of the paged decode kernel were compiled too
    flags = {(v["constants"]["STORE_LOGITS"], v["constants"]["SLIDING"]) for v in bf16
             if v["kernel"] == "_paged_split_kernel"}
    assert {(False, False), (True, False), (True, True)} <= flags, flags
    assert not {v["module"] for v in variants} - {"triton_attention", "triton_stats", "triton_paged", "triton_combine"}
    tiles = {v["constants"]["TILE_BLOCKS"] for v in bf16 if v["kernel"] == "_paged_split_kernel"}
    assert tiles == {1, 2, 4}
    windows = {v["constants"]["HAS_WINDOW"] for v in bf16 if v["kernel"] == "_prefill_kernel"}
    assert windows == {False, True}


def test_prefill_tiles_shrink_to_fit_a_chip_with_less_shared_memory():
    """sm_86 (RTX 3090, A10; sm_89 alike) has 99 KiB per program; the Hopper bf16 prefill tile for head
    size 128 needs 129 KiB. The launcher asks the driver and picks a tile that fits (the script exits 1
    on any variant over the limit)."""
    run, variants = _compile("--arch", "86", "--dtypes", "bf16,fp32", "--shapes", "llama-3.1-8b",
                             "--launchers", "prefill", "--full", "none")
    _assert_compiled(run, variants)
    assert {v["dtype"] for v in variants} == {"bf16", "fp32"}
    assert all(v["kernel"] == "_prefill_kernel" and v["shared"] <= 101376 for v in variants)
    assert [v["num_stages"] for v in variants if v["dtype"] == "bf16"] == [2]  # 3 on Hopper

"""Triton kernels against their plain-PyTorch twins, on fresh random inputs.

Every kernel runs twice over: on the CPU under the Triton interpreter (fp32 and fp16; the interpreter's
bf16 dot is wrong) with small tiles so that small shapes still cross tile and split boundaries, and, marked
`gpu`, compiled on CUDA (fp32, fp16, bf16) with the production tile sizes plus larger shapes.

Triton reads TRITON_INTERPRET when it decorates a function, its own standard library (tl.cdiv, tl.sum)
included, so the variable must be set before triton is first imported in the process: this module sets it
at import when there is no CUDA and nothing has imported triton yet (kvx itself imports triton lazily). If
something did, the interpreter cases skip in-process and one test reruns them in a fresh process. On a
machine with CUDA the interpreter cases are skipped, and the gpu-marked ones use the compiled kernels.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from kvx.errors import KvxError
from kvx.kernels import ops
from kvx.kernels import reference as ref
from kvx.kernels.stats import StatsRequest, compute_layer_stats

from interpreter import HAS_CUDA, interpreter_active, request_interpreter, rerun_in_fresh_process

request_interpreter()
KERNEL_MODULES = ("triton_attention", "triton_stats")
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]


@dataclass
class Backend:
    device: str
    k: SimpleNamespace  # the kernel modules
    dtype: torch.dtype
    attn_blocks: tuple | None = None
    stats_blocks: tuple | None = None
    decode_blocks: tuple | None = None
    decode_chunk: int | None = None

    def randn(self, *shape, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape) * scale).to(device=self.device, dtype=self.dtype)


# Output tolerance (atol = rtol) by input dtype: probabilities are rounded to the input dtype before P·V.
OUT_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@pytest.fixture(scope="module")
def interpreted_kernels():
    if HAS_CUDA:
        pytest.skip("interpreter cases run only where CUDA is absent; the gpu-marked cases cover CUDA")
    pytest.importorskip("triton")
    if not interpreter_active():
        pytest.skip("triton was imported before TRITON_INTERPRET could be set; "
                    "test_kernel_cases_in_a_fresh_process runs these cases")
    from triton.runtime.interpreter import InterpretedFunction

    mods = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"kvx.kernels.{name}")
        jitted = [obj for obj in vars(module).values() if hasattr(obj, "fn") and hasattr(obj, "__getitem__")]
        if not all(isinstance(obj, InterpretedFunction) for obj in jitted):
            module = importlib.reload(module)  # imported earlier without the interpreter: decorate again
        mods[name.removeprefix("triton_")] = module
    return SimpleNamespace(**mods)


def test_kernel_cases_in_a_fresh_process():
    """Runs the interpreter cases in a new process when this one imported triton too early for them."""
    if HAS_CUDA or interpreter_active():
        pytest.skip("the interpreter cases run in this process (or CUDA covers the kernels)")
    pytest.importorskip("triton")
    run = rerun_in_fresh_process(__file__, "interp")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " skipped" not in run.stdout.splitlines()[-1], run.stdout[-2000:]


def _compiled_kernels() -> SimpleNamespace:
    return SimpleNamespace(**{
        name.removeprefix("triton_"): importlib.import_module(f"kvx.kernels.{name}") for name in KERNEL_MODULES
    })


CASES = [
    pytest.param(("interp", torch.float32), id="interp-fp32"),
    pytest.param(("interp", torch.float16), id="interp-fp16"),
    pytest.param(("cuda", torch.float32), id="cuda-fp32", marks=GPU),
    pytest.param(("cuda", torch.float16), id="cuda-fp16", marks=GPU),
    pytest.param(("cuda", torch.bfloat16), id="cuda-bf16", marks=GPU),
]


@pytest.fixture(params=CASES)
def bk(request) -> Backend:
    kind, dtype = request.param
    if kind == "interp":
        return Backend("cpu", request.getfixturevalue("interpreted_kernels"), dtype,
                       attn_blocks=(16, 16, 4, 1), stats_blocks=(16, 16, 4), decode_blocks=(16, 4, 1),
                       decode_chunk=32)
    return Backend("cuda", _compiled_kernels(), dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def close(actual, expected, tol, what):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    err = (actual - expected).abs()
    bound = tol + tol * expected.abs()
    worst = (err - bound).max().item() if err.numel() else 0.0
    assert worst <= 0, f"{what}: max abs error {err.max().item():.3g} exceeds tolerance {tol}"


# --- prefill attention ----------------------------------------------------------------------------------------

ATTENTION_SHAPES = [  # H, Hkv, T, S, d, sliding window
    (4, 4, 37, 37, 32, None),  # G=1, square causal, odd length
    (6, 2, 19, 53, 16, None),  # G=3, queries are the last 19 of 53 keys
    (8, 2, 45, 45, 64, 7),  # G=4, sliding window
    (8, 1, 33, 50, 32, 16),  # G=8, T < S and a window
    (4, 2, 1, 29, 16, None),  # one query over a cache (decode through the prefill kernel)
]


def _attention_case(bk: Backend, H, Hkv, T, S, d, window, need_lse=True, blocks=None):
    q, k, v = bk.randn(H, T, d), bk.randn(Hkv, S, d), bk.randn(Hkv, S, d)
    k_pos = torch.arange(S, device=bk.device) + 5
    q_pos = k_pos[S - T:]
    scale = d ** -0.5
    out, lse = bk.k.attention.attention(q, k, v, q_pos, k_pos, scale, window, need_lse, blocks=blocks)
    ref_out, ref_lse = ref.attention(q.float(), k.float(), v.float(), q_pos, k_pos, scale, window, True)
    assert out.dtype == bk.dtype and out.shape == (H, T, d)
    close(out, ref_out, OUT_TOL[bk.dtype], "attention output")
    if need_lse:
        assert lse.dtype == torch.float32 and lse.shape == (H, T)
        close(lse, ref_lse, 1e-4, "attention lse")
    else:
        assert lse is None


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "H{}-Hkv{}-T{}-S{}-d{}-w{}".format(*s))
def test_attention_matches_reference(bk, shape):
    _attention_case(bk, *shape, blocks=bk.attn_blocks)


def test_attention_without_lse(bk):
    _attention_case(bk, 4, 2, 21, 21, 16, None, need_lse=False, blocks=bk.attn_blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_prefill_tile_fits_the_shared_memory_it_is_given(d, dtype):
    """A Hopper keeps the tuned tile; a chip with less shared memory gets fewer stages, then shorter query
    tiles, until the estimate fits (tests/test_triton_aot.py checks the compiler's own count)."""
    ta = importlib.import_module("kvx.kernels.triton_attention")
    tuned = ta._prefill_config(d, dtype)
    assert ta._prefill_config(d, dtype, 232448) == tuned
    elem = torch.finfo(dtype).bits // 8
    for limit in (101376, 65536, 32768):
        block_m, block_n, warps, stages = ta._prefill_config(d, dtype, limit)
        assert (block_n, warps) == tuned[1:3] and block_m <= tuned[0] and stages <= tuned[3]
        fits = ta._prefill_shared_bytes(block_m, block_n, max(16, d), stages, elem) <= limit
        assert fits or (block_m, stages) == (16, 1)
    assert ta._prefill_config(128, torch.bfloat16, 101376) == (128, 64, 8, 2)  # an RTX 4090 / L4 / A10


def test_attention_with_a_tile_shrunk_for_shared_memory(bk):
    """The tile chosen for a small shared memory computes the same attention."""
    blocks = bk.k.attention._prefill_config(32, bk.dtype, 20000)
    assert blocks != bk.k.attention._prefill_config(32, bk.dtype)
    _attention_case(bk, 4, 2, 70, 70, 32, 9, blocks=blocks)


def test_attention_arbitrary_positions_and_strides(bk):
    """Unsorted positions with gaps, strided inputs, and rows that see no key (zeros, lse = -inf)."""
    H, Hkv, T, S, d = 6, 2, 23, 41, 32
    q = bk.randn(T, H, d).transpose(0, 1)  # [H, T, d] view with the model's [T, H, d] layout
    k = bk.randn(S, Hkv, d).transpose(0, 1)
    v = bk.randn(Hkv, S + 9, d)[:, 4:4 + S]
    k_pos = torch.randperm(3 * S)[:S].to(bk.device)
    q_pos = torch.randint(-3, 3 * S, (T,)).to(bk.device)
    q_pos[0] = int(k_pos.min()) - 1  # sees nothing
    for window in (None, 11):
        out, lse = bk.k.attention.attention(q, k, v, q_pos, k_pos, 0.2, window, True, blocks=bk.attn_blocks)
        ref_out, ref_lse = ref.attention(q.float(), k.float(), v.float(), q_pos, k_pos, 0.2, window, True)
        seen = ref.visibility_mask(q_pos, k_pos, window).any(dim=1)
        assert not bool(seen[0])
        close(out[:, seen], ref_out[:, seen], OUT_TOL[bk.dtype], "attention output")
        close(lse[:, seen], ref_lse[:, seen], 1e-4, "attention lse")
        assert bool((out[:, ~seen] == 0).all()) and bool(torch.isneginf(lse[:, ~seen]).all())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,S,window", [(1000, 1000, None), (700, 1500, None), (1100, 1100, 300), (1, 2049, None)])
def test_attention_large_on_gpu(dtype, T, S, window):
    bk = Backend("cuda", _compiled_kernels(), dtype)
    _attention_case(bk, 32, 8, T, S, 128, window)


# --- window statistics ------------------------------------------------------------------------------------------

STATS_SHAPES = [  # H, Hkv, T, d, window rows, sliding window
    (4, 4, 29, 16, 1, None),  # TOVA: one row
    (8, 2, 50, 32, 9, 13),  # G=4, with a sliding window
    (6, 2, 41, 32, 41, None),  # every row: H2O's column sums
]


@pytest.mark.parametrize("shape", STATS_SHAPES, ids=lambda s: "H{}-Hkv{}-T{}-d{}-w{}-sw{}".format(*s))
def test_window_stats_match_compute_layer_stats(bk, shape):
    H, Hkv, T, d, w, window = shape
    q, k, v = bk.randn(H, T, d), bk.randn(Hkv, T, d), bk.randn(Hkv, T, d)
    pos = torch.arange(T, device=bk.device) + 2
    scale = d ** -0.5
    qf, kf, vf = q.float(), k.float(), v.float()
    _, lse = ref.attention(qf, kf, vf, pos, pos, scale, window, True)
    col_sum, col_sq = bk.k.stats.window_stats(
        q[:, T - w:], k, pos[T - w:], pos, lse[:, T - w:], scale, window, True, blocks=bk.stats_blocks)
    want = compute_layer_stats(StatsRequest(window=w, window_sq=True, colsum_all=True), qf, kf, vf, pos, pos,
                               scale, window)
    close(col_sum, want.col_sum, 1e-4, "col_sum")
    close(col_sq, want.col_sq, 1e-4, "col_sq")
    if w == T:
        close(col_sum, want.colsum_all, 1e-4, "colsum_all")
    no_sq, none = bk.k.stats.window_stats(
        q[:, T - w:], k, pos[T - w:], pos, lse[:, T - w:], scale, window, False, blocks=bk.stats_blocks)
    assert none is None
    close(no_sq, want.col_sum, 1e-4, "col_sum without squares")


@pytest.mark.parametrize("budget,window", [(10, None), (30, 17)])
def test_sg_colsum_matches_compute_layer_stats(bk, budget, window):
    """Rows past the budget sharpen (lambda > scale); rows before it are clamped to the model's scale."""
    H, Hkv, T, d, rows = 6, 3, 44, 32, 20
    q, k, v = bk.randn(H, T, d), bk.randn(Hkv, T, d), bk.randn(Hkv, T, d)
    pos = torch.arange(T, device=bk.device)
    scale = d ** -0.5
    got = bk.k.stats.sg_colsum(q[:, T - rows:], k, pos[T - rows:], pos, budget, scale, window, blocks=bk.stats_blocks)
    want = compute_layer_stats(StatsRequest(sg_rows=rows, sg_budget=budget), q.float(), k.float(), v.float(),
                               pos, pos, scale, window)
    close(got, want.col_sum_sg, 1e-4, "col_sum_sg")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_stats_large_on_gpu():
    bk = Backend("cuda", _compiled_kernels(), torch.bfloat16)
    H, Hkv, T, d, w = 32, 8, 3000, 128, 64
    q, k, v = bk.randn(H, T, d), bk.randn(Hkv, T, d), bk.randn(Hkv, T, d)
    pos = torch.arange(T, device="cuda")
    qf, kf, vf = q.float(), k.float(), v.float()
    _, lse = bk.k.attention.attention(q, k, v, pos, pos, d ** -0.5, None, True)
    col_sum, col_sq = bk.k.stats.window_stats(q[:, -w:], k, pos[-w:], pos, lse[:, -w:], d ** -0.5, None, True)
    all_rows, _ = bk.k.stats.window_stats(q, k, pos, pos, lse, d ** -0.5, None, False)
    sg = bk.k.stats.sg_colsum(q[:, -32:], k, pos[-32:], pos, 500, d ** -0.5, None)
    want = compute_layer_stats(StatsRequest(window=w, window_sq=True, colsum_all=True, sg_rows=32, sg_budget=500),
                               qf, kf, vf, pos, pos, d ** -0.5)
    close(col_sum, want.col_sum, 1e-3, "col_sum")
    close(col_sq, want.col_sq, 1e-3, "col_sq")
    close(all_rows, want.colsum_all, 1e-3, "colsum_all")
    close(sg, want.col_sum_sg, 1e-3, "col_sum_sg")


# --- dispatch and the reference twins of the statistics kernels -------------------------------------------------


def test_ops_dispatch_on_cpu(monkeypatch):
    q, k, v = torch.randn(4, 9, 16), torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    pos = torch.arange(9)
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    assert not ops.use_triton(q)
    out, lse = ops.attention(q, k, v, pos, pos, 0.25, None, True)
    want, want_lse = ref.attention(q, k, v, pos, pos, 0.25, None, True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    monkeypatch.setenv(ops.BACKEND_ENV, "reference")
    assert not ops.use_triton(q)
    monkeypatch.setenv(ops.BACKEND_ENV, "cuda-please")
    with pytest.raises(KvxError):
        ops.use_triton(q)


def test_ops_forced_triton_runs_the_interpreter(interpreted_kernels, monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "triton")
    q, k, v = torch.randn(4, 20, 16), torch.randn(2, 20, 16), torch.randn(2, 20, 16)
    pos = torch.arange(20)
    out, lse = ops.attention(q, k, v, pos, pos, 0.25, 5, True)
    want, want_lse = ref.attention(q, k, v, pos, pos, 0.25, 5, True)
    close(out, want, 1e-4, "forced triton output")
    close(lse, want_lse, 1e-4, "forced triton lse")


@pytest.mark.parametrize("sliding", [None, 11])
def test_layer_stats_through_the_kernels_equal_compute_layer_stats(interpreted_kernels, monkeypatch, sliding):
    """What the engine calls: every requested statistic, attention side from the kernels, the rest as is."""
    monkeypatch.setenv(ops.BACKEND_ENV, "triton")
    H, Hkv, T, d = 6, 2, 40, 16
    q, k, v = torch.randn(H, T, d), torch.randn(Hkv, T, d), torch.randn(Hkv, T, d)
    pos = torch.arange(T) + 3
    req = StatsRequest(window=9, window_sq=True, last_row=True, colsum_all=True, sg_rows=7, sg_budget=12,
                       key_norm=True, value_norm=True, query_moments=True)
    got = ops.layer_stats(req, q, k, v, pos, pos, d ** -0.5, sliding, q_pre_rope=q)
    want = compute_layer_stats(req, q, k, v, pos, pos, d ** -0.5, sliding, q_pre_rope=q)
    assert got.window == want.window == 9 and got.n == want.n
    for name in ("col_sum", "col_sq", "last_row", "colsum_all", "colsum_count", "col_sum_sg", "key_norm",
                 "value_norm", "q_mean", "q_cov"):
        close(getattr(got, name), getattr(want, name), 1e-4, name)
    only_window = StatsRequest(window=100)  # more rows than the prompt has: the window is the whole prompt
    got = ops.layer_stats(only_window, q, k, v, pos, pos, d ** -0.5, sliding)
    want = compute_layer_stats(only_window, q, k, v, pos, pos, d ** -0.5, sliding)
    close(got.col_sum, want.col_sum, 1e-4, "col_sum over every row")
    assert got.col_sq is None and got.last_row is None and got.colsum_all is None


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_stats_on_gpu(dtype):
    H, Hkv, T, d = 32, 8, 2500, 128
    q, k, v = (torch.randn(s, device="cuda").to(dtype) for s in ((H, T, d), (Hkv, T, d), (Hkv, T, d)))
    pos = torch.arange(T, device="cuda")
    req = StatsRequest(window=64, window_sq=True, last_row=True, colsum_all=True, sg_rows=32, sg_budget=250)
    got = ops.layer_stats(req, q, k, v, pos, pos, d ** -0.5)
    want = compute_layer_stats(req, q.float(), k.float(), v.float(), pos, pos, d ** -0.5)
    for name in ("col_sum", "col_sq", "last_row", "colsum_all", "colsum_count", "col_sum_sg"):
        close(getattr(got, name), getattr(want, name), 2e-2, name)


@pytest.mark.parametrize("window", [None, 6])
def test_reference_stats_twins_match_compute_layer_stats(window):
    H, Hkv, T, d, w = 6, 2, 300, 16, 270  # w > QUERY_CHUNK: the twins chunk over rows
    q, k, v = torch.randn(H, T, d), torch.randn(Hkv, T, d), torch.randn(Hkv, T, d)
    pos = torch.arange(T) + 1
    _, lse = ref.attention(q, k, v, pos, pos, d ** -0.5, window, True)
    want = compute_layer_stats(StatsRequest(window=w, window_sq=True, sg_rows=w, sg_budget=40), q, k, v, pos, pos,
                               d ** -0.5, window)
    col_sum, col_sq = ops.window_stats(q[:, -w:], k, pos[-w:], pos, lse[:, -w:], d ** -0.5, window, True)
    close(col_sum, want.col_sum, 1e-5, "reference col_sum")
    close(col_sq, want.col_sq, 1e-5, "reference col_sq")
    sg = ops.sg_colsum(q[:, -w:], k, pos[-w:], pos, 40, d ** -0.5, window)
    close(sg, want.col_sum_sg, 1e-5, "reference col_sum_sg")


@pytest.mark.parametrize("rows,keys", [(20, 44), (5, 70)])
def test_column_max_matches_the_reference(bk, rows, keys):
    """KVzip's col_max: max over the rows of their probabilities over a key subset, optionally weighted."""
    from kvx.kernels.stats import col_max_over_rows

    H, Hkv, d = 6, 3, 32
    q, k, v = bk.randn(H, rows, d), bk.randn(Hkv, keys, d), bk.randn(Hkv, keys, d)
    k_pos = torch.cat([torch.arange(3), torch.arange(10, 10 + keys - 3 - rows), torch.arange(90, 90 + rows)])
    k_pos = k_pos.to(bk.device)
    q_pos = k_pos[-rows:]
    scale = d ** -0.5
    _, lse = ref.attention(q.float(), k.float(), v.float(), q_pos, k_pos, scale, None, True)
    w = torch.rand(rows).to(bk.device) + 0.5
    for weight in (None, w):
        got = bk.k.stats.column_max(q, k, q_pos, k_pos, lse, scale, weight, blocks=bk.stats_blocks)
        close(got, col_max_over_rows(q.float(), k.float(), q_pos, k_pos, scale, weight), 1e-4, "col_max")

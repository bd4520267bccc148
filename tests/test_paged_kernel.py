"""Paged decode attention: the reference against a plain per-segment loop, and the Triton kernel against
the reference under TRITON_INTERPRET=1 (fp32, fp16) and, marked gpu, compiled on CUDA.

Inputs are fresh random pools with shuffled block tables, ragged lengths (empty segments included),
several block sizes, every mass mode and a sliding window. As in test_triton_kernels.py the interpreter
must be switched on before triton is first imported; when something imported it earlier the interpreter
cases rerun in a fresh process.
"""

from __future__ import annotations

import pytest
import torch

from interpreter import HAS_CUDA, interpreter_active, request_interpreter, rerun_in_fresh_process

request_interpreter()

from kvx.kernels import reference as ref  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _case(seed: int, block: int, n_seg: int = 7, G: int = 3, d: int = 16, max_blocks: int = 5,
          dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    num_blocks = n_seg * max_blocks + 3
    k = torch.randn(num_blocks, block, d, generator=g).to(device, dtype)
    v = torch.randn(num_blocks, block, d, generator=g).to(device, dtype)
    pos = torch.randint(0, 500, (num_blocks, block), generator=g).to(device)
    q = torch.randn(n_seg, G, d, generator=g).to(device, dtype)
    lengths = torch.randint(0, max_blocks * block + 1, (n_seg,), generator=g)
    lengths[0] = 0  # an empty segment
    lengths[1] = max_blocks * block  # a full one
    perm = torch.randperm(num_blocks, generator=g)[: n_seg * max_blocks].view(n_seg, max_blocks)
    tables = perm.to(torch.int32)
    # What lies past a segment's length is stale: finite (the pool zeroes blocks it hands out) but large.
    for n in range(n_seg):
        for j in range(int(lengths[n]), max_blocks * block):
            b = int(perm[n, j // block])
            k[b, j % block] = 1e4
            v[b, j % block] = -1e4
    q_pos = torch.full((n_seg,), 500, dtype=torch.int64)
    mass = torch.rand(num_blocks, block, generator=g)
    mode = torch.randint(0, 3, (n_seg,), generator=g).to(torch.int32)
    return dict(q=q, k=k, v=v, pos=pos, tables=tables.to(device), lengths=lengths.to(torch.int32).to(device),
                q_pos=q_pos.to(device), mass=mass.to(device), mode=mode.to(device))


def _loop_reference(c, scale, window):
    """One segment at a time, softmax written out: the definition."""
    N, G, d = c["q"].shape
    B = c["k"].shape[1]
    out = torch.zeros(N, G, d)
    mass = c["mass"].clone().cpu()
    for n in range(N):
        L = int(c["lengths"][n])
        if L == 0:
            continue
        slots = [int(c["tables"][n][j // B]) * B + j % B for j in range(L)]
        keys = c["k"].reshape(-1, d)[slots].float().cpu()
        vals = c["v"].reshape(-1, d)[slots].float().cpu()
        kp = c["pos"].reshape(-1)[slots].cpu()
        vis = torch.ones(L, dtype=torch.bool) if window is None else (int(c["q_pos"][n]) - kp) < window
        if not vis.any():
            if int(c["mode"][n]) == 2:
                mass.view(-1)[slots] = 0.0
            continue
        logits = (c["q"][n].float().cpu() @ keys.T) * scale
        logits[:, ~vis] = float("-inf")
        p = torch.softmax(logits, -1)
        out[n] = p @ vals
        m = int(c["mode"][n])
        flat = mass.view(-1)
        for j, s in enumerate(slots):
            if m == 1:
                flat[s] += p[:, j].sum()
            elif m == 2:
                flat[s] = p[:, j].sum()  # 0 where the window hides the key
    return out, mass


def _run(fn, c, scale, window, mass=True):
    m = c["mass"].clone()
    out = fn(c["q"], c["k"], c["v"], c["tables"], c["lengths"], scale,
             mass_pool=m if mass else None, mass_mode=c["mode"] if mass else None,
             pos_pool=c["pos"], q_pos=c["q_pos"], sliding_window=window, max_len=c["tables"].shape[1] * c["k"].shape[1])
    return out, m


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_equals_the_loop(block, window, seed):
    c = _case(seed, block)
    out, mass = _run(ref.paged_decode_attention, c, 0.25, window)
    want_out, want_mass = _loop_reference(c, 0.25, window)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass, want_mass, atol=1e-5, rtol=1e-5)


def _triton_cases(device, dtypes):
    from kvx.kernels import triton_paged

    for dtype in dtypes:
        for block, tile_blocks in ((16, 1), (32, 1), (64, 1), (16, 2), (16, 4), (32, 2)):
            for window in (None, 40):
                for chunk in (None, block):  # default split plan, and one tile per split program
                    c = _case(3 + block + tile_blocks, block, dtype=dtype, device=device)
                    fn = lambda *a, **k: triton_paged.paged_decode_attention(  # noqa: E731
                        *a, **k, chunk=chunk, tile_blocks=tile_blocks)
                    out, mass = _run(fn, c, 0.3, window)
                    want, want_mass = _run(ref.paged_decode_attention, c, 0.3, window)
                    tol = TOL[dtype]
                    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
                    torch.testing.assert_close(mass, want_mass, atol=1e-3 if dtype != torch.float32 else 1e-5,
                                               rtol=1e-3)


def test_triton_paged_interp():
    if HAS_CUDA:
        pytest.skip("CUDA present: the gpu-marked test covers the compiled kernel")
    pytest.importorskip("triton")
    if not interpreter_active():
        run = rerun_in_fresh_process(__file__, "triton_paged_interp")
        assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
        return
    _triton_cases("cpu", (torch.float32, torch.float16))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_triton_paged_on_gpu():
    _triton_cases("cuda", (torch.float32, torch.float16, torch.bfloat16))


def test_paged_kernel_benchmark_smoke_run():
    """benchmarks/bench_kernels.py --paged gets one run on a lent GPU: its setup (a shuffled table, the same
    keys laid out densely for torch SDPA, its baseline) and its equality checks run here under the
    interpreter, SDPA on CPU tensors."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_kernels.py"), "--paged", "--tiny"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if "paged = sdpa for" in line]
    assert len(lines) == 2, run.stdout
    for line in lines:
        for variant in ("paged;", "paged +mass", "2 blocks a tile", "4 blocks a tile", "paged, splits x4",
                        "paged, splits x16"):
            assert variant in line, run.stdout
    assert "contiguous" not in run.stdout


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window", [None, 40])
def test_reference_reads_consecutive_blocks_as_slices(seed, window):
    """A lone sequence's segments usually hold consecutive blocks: the reference reads them as slices of
    the pool (no gather per step), with the same outputs and mass as the definition."""
    c = _case(seed, block=8, n_seg=5)
    # Give every segment its own run of consecutive block ids (as a fresh pool hands them out).
    mb = c["tables"].shape[1]
    c["tables"] = (torch.arange(5 * mb, dtype=torch.int32).view(5, mb) + 2).flip(0).contiguous()
    assert ref._consecutive_starts(c["tables"], c["lengths"], 8) is not None
    out, mass = _run(ref.paged_decode_attention, c, 0.25, window)
    want, want_mass = _loop_reference(c, 0.25, window)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass, want_mass, rtol=1e-5, atol=1e-6)
    # a table with one block out of order is gathered instead
    c["tables"][2, 1], c["tables"][2, 2] = c["tables"][2, 2].clone(), c["tables"][2, 1].clone()
    assert ref._consecutive_starts(c["tables"], torch.full((5,), 5 * 8, dtype=torch.int32), 8) is None


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n_seg", [1, 3, 4])
def test_reference_attends_evenly_strided_segments_at_once(seed, n_seg):
    """A lone request's kv heads (equal lengths, each segment's blocks a fixed stride after the last) are
    attended in one fused call over strided views of the pool: same outputs as the definition; with a mass
    mode or a window, or unequal lengths, the per-segment path runs instead (also the definition)."""
    c = _case(seed, block=8, n_seg=5)
    c["q"] = c["q"][:n_seg]
    c["q_pos"] = c["q_pos"][:n_seg]
    mb = c["tables"].shape[1]
    gap = 1 + seed  # spare blocks between segments: the stride is more than the length
    c["tables"] = torch.stack([torch.arange(mb, dtype=torch.int32) + 1 + i * (mb + gap) for i in range(n_seg)])
    n = int(torch.randint(1, mb * 8 + 1, (1,), generator=torch.Generator().manual_seed(seed)))
    c["lengths"] = torch.full((n_seg,), n, dtype=torch.int32)
    c["k"] = torch.randn(n_seg * (mb + gap) + 2, 8, c["k"].shape[-1], generator=torch.Generator().manual_seed(7))
    c["v"] = torch.randn_like(c["k"])
    c["pos"] = torch.zeros(c["k"].shape[:2], dtype=torch.int64)
    c["mass"] = torch.rand(c["k"].shape[:2])
    starts = ref._consecutive_starts(c["tables"], c["lengths"], 8)
    assert ref._strided_runs(starts, [n] * n_seg) == [(0, n_seg, (mb + gap) * 8 if n_seg > 1 else n, n)]  # one run
    c["mode"] = torch.zeros(n_seg, dtype=torch.int32)
    out, _ = _run(ref.paged_decode_attention, c, 0.3, None, mass=False)
    want, _ = _loop_reference(c, 0.3, None)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    c["mode"] = torch.ones(n_seg, dtype=torch.int32)  # H2O's mass: the per-segment path, same definition
    out, mass = _run(ref.paged_decode_attention, c, 0.3, None)
    want, want_mass = _loop_reference(c, 0.3, None)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass, want_mass, rtol=1e-5, atol=1e-6)
    assert len(ref._strided_runs([0, 40, 90], [5, 5, 5])) == 2  # uneven stride: not one run
    assert len(ref._strided_runs([0, 40, 80], [5, 6, 5])) == 3  # unequal lengths
    assert len(ref._strided_runs([0, 4, 8], [5, 5, 5])) == 3  # overlapping


@pytest.mark.parametrize("n", [1, 31, 200])
def test_evenly_strided_segments_equal_gathered_ones_bit_for_bit(n):
    """A request's tokens must not depend on where the pool put its blocks: the same keys read as evenly
    strided slices and gathered from shuffled blocks give the same bits (the same ops on the same shapes)."""
    g = torch.Generator().manual_seed(n)
    B, d, G, N = 32, 64, 3, 3
    nb = -(-n // B)
    keys, vals = torch.randn(N, nb * B, d, generator=g), torch.randn(N, nb * B, d, generator=g)
    q = torch.randn(N, G, d, generator=g)
    lengths = torch.full((N,), n, dtype=torch.int32)
    outs = []
    for order in ("strided", "shuffled"):
        total = N * nb + 5
        ids = torch.arange(N * nb) + 2 if order == "strided" else torch.randperm(total, generator=g)[:N * nb]
        tables = ids.view(N, nb).to(torch.int32)
        k_pool, v_pool = torch.zeros(total + 2, B, d), torch.zeros(total + 2, B, d)
        k_pool[tables.long()] = keys.view(N, nb, B, d)
        v_pool[tables.long()] = vals.view(N, nb, B, d)
        outs.append(ref.paged_decode_attention(q, k_pool, v_pool, tables, lengths, 0.125))
    assert torch.equal(outs[0], outs[1])


def test_a_batch_of_one_piece_sequences_is_read_as_strided_runs():
    """18 segments (6 sequences x 3 kv heads, each sequence's blocks in one piece, lengths differing between
    sequences): more than the few-segment limit, read as 6 strided runs when the step gives their starts;
    the definition's outputs, and each sequence's rows bit for bit what it gets alone."""
    g = torch.Generator().manual_seed(11)
    B, d, G, Hkv, S = 8, 16, 3, 3, 6
    lens = [int(x) for x in torch.randint(1, 40, (S,), generator=g)]
    tables, first = [], 2
    for s in range(S):
        nb = -(-lens[s] // B) + 1  # a spare block of headroom, as a fresh request's allocation has
        for h in range(Hkv):
            tables.append(list(range(first, first + nb)))
            first += nb
    W = max(map(len, tables))
    k = torch.randn(first + 2, B, d, generator=g)
    c = dict(q=torch.randn(S * Hkv, G, d, generator=g), k=k, v=torch.randn_like(k),
             pos=torch.zeros(first + 2, B, dtype=torch.int64),
             tables=torch.tensor([t + [0] * (W - len(t)) for t in tables], dtype=torch.int32),
             lengths=torch.tensor([n for n in lens for _ in range(Hkv)], dtype=torch.int32),
             q_pos=torch.full((S * Hkv,), 500), mass=torch.rand(first + 2, B),
             mode=torch.zeros(S * Hkv, dtype=torch.int32))
    starts = [t[0] * B for t in tables]
    runs = ref._strided_runs(starts, c["lengths"].tolist())
    assert [(a, b) for a, b, _, _ in runs] == [(s * Hkv, (s + 1) * Hkv) for s in range(S)]
    out = ref.paged_decode_attention(c["q"], c["k"], c["v"], c["tables"], c["lengths"], 0.25, row_starts=starts)
    want, _ = _loop_reference(c, 0.25, None)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for s in range(S):
        rows = slice(s * Hkv, (s + 1) * Hkv)
        alone = ref.paged_decode_attention(c["q"][rows], c["k"], c["v"], c["tables"][rows], c["lengths"][rows], 0.25,
                                           row_starts=starts[rows])
        assert torch.equal(out[rows], alone)

"""kvx's C kernels for the CPU (kernels/cpu_native.c) against plain PyTorch references, on fresh random
inputs: the int8 product (tiled weights, float32 activations) and the paged decode attention, with the
properties the engine relies on — a row's result does not depend on its batch, a segment's does not depend
on where the pool put its blocks — and the fallbacks (no compiler, KVX_NATIVE=0)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kvx.kernels import cpu_native, reference

lib = cpu_native.library()
needs_lib = pytest.mark.skipif(lib is None, reason="kvx's C kernels did not build here (no C compiler)")


@pytest.mark.parametrize("N,K", [(96, 64), (7, 45), (13, 1536), (4, 16), (3, 5), (1, 17), (130, 576)])
def test_tiling_round_trips(N, K):
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=torch.Generator().manual_seed(N * K))
    t = cpu_native.tile(q)
    assert t.shape == (N * K,) and t.is_contiguous()
    assert torch.equal(cpu_native.untile(t, N, K), q)


@needs_lib
@pytest.mark.parametrize("N,K", [(96, 64), (7, 45), (13, 1536), (4, 16), (3, 5), (1, 17), (130, 576)])
def test_int8_linear_equals_the_dequantized_product_and_rows_are_independent(N, K):
    gen = torch.Generator().manual_seed(N + 1000 * K)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    scale = torch.rand(N, generator=gen) * 0.02
    bias = torch.randn(N, generator=gen)
    x = torch.randn(21, K, generator=gen)
    t = cpu_native.tile(q)
    y = cpu_native.int8_linear(lib, t, scale, x, bias)
    exact = (x.double() @ q.double().t()) * scale.double() + bias.double()
    assert y.dtype == torch.float32 and y.shape == (21, N)
    # float32 activations, exact int8 values: float32 rounding of a K-term sum, not bfloat16's
    assert ((y.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5
    for rows in (1, 2, 3, 4, 5, 16, 21):  # every tile shape of the kernel's row blocks
        assert torch.equal(cpu_native.int8_linear(lib, t, scale, x[:rows], bias), y[:rows]), rows
    for i in (0, 6, 20):  # a row alone equals it among neighbours
        assert torch.equal(cpu_native.int8_linear(lib, t, scale, x[i:i + 1], bias), y[i:i + 1])
    # a strided view of the activations (a slice of a wider buffer) reads the same numbers
    wide = torch.randn(21, K + 7, generator=gen)
    wide[:, 3:3 + K] = x
    assert torch.equal(cpu_native.int8_linear(lib, t, scale, wide[:, 3:3 + K], bias), y)
    assert torch.allclose(cpu_native.int8_linear(lib, t, scale, x) + bias, y, rtol=0, atol=1e-5)  # no bias


def _paged(gen, lens, B, d, G, shuffle=True):
    """A pool holding len(lens) segments' keys in randomly placed blocks, and their block tables."""
    blocks = sum(-(-n // B) for n in lens) + 3
    k_pool, v_pool = torch.randn(blocks, B, d, generator=gen), torch.randn(blocks, B, d, generator=gen)
    pos_pool = torch.randint(0, 4000, (blocks, B), generator=gen)
    ids = (torch.randperm(blocks, generator=gen) if shuffle else torch.arange(blocks)).tolist()
    W = max(1, max(-(-n // B) for n in lens))
    tables = torch.zeros(len(lens), W, dtype=torch.int32)
    for i, n in enumerate(lens):
        nb = -(-n // B)
        tables[i, :nb] = torch.tensor([ids.pop(0) for _ in range(nb)], dtype=torch.int32)
    q = torch.randn(len(lens), G, d, generator=gen)
    return q, k_pool, v_pool, pos_pool, tables, torch.tensor(lens, dtype=torch.int32)


CASES = [  # lengths, block size, head dim, query heads per kv head, window, mass modes
    ([1000, 1000, 1000], 16, 64, 3, None, None),
    ([0, 7, 300, 513, 1], 8, 40, 2, None, None),
    ([700, 20, 256, 257], 16, 16, 4, 500, None),
    ([900, 30, 0, 512, 257, 1], 16, 64, 3, None, [1, 2, 0, 1, 2, 2]),
    ([900, 30, 5, 512, 257, 1], 16, 128, 1, 700, [1, 2, 0, 1, 2, 2]),
    ([2048, 64], 32, 128, 8, None, [2, 1]),
]


@needs_lib
@pytest.mark.parametrize("lens,B,d,G,window,modes", CASES)
def test_paged_decode_attention_matches_the_reference(lens, B, d, G, window, modes):
    gen = torch.Generator().manual_seed(sum(lens) + d)
    q, k_pool, v_pool, pos_pool, tables, lengths = _paged(gen, lens, B, d, G)
    q_pos = torch.randint(1000, 4000, (len(lens),), generator=gen)
    mode = None if modes is None else torch.tensor(modes, dtype=torch.int32)
    mass_ref = torch.rand(k_pool.shape[:2], generator=gen)
    mass = mass_ref.clone()
    kw = dict(pos_pool=pos_pool, q_pos=q_pos, sliding_window=window, mass_mode=mode)
    want = reference.paged_decode_attention(q, k_pool, v_pool, tables, lengths, 0.125,
                                            mass_pool=mass_ref if mode is not None else None, **kw)
    got = cpu_native.paged_decode_attention(lib, q, k_pool, v_pool, tables, lengths, 0.125,
                                            mass_pool=mass if mode is not None else None, **kw)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max().item() < 2e-5
    assert (mass - mass_ref).abs().max().item() < 2e-5  # added, replaced, or left as it was
    for i, n in enumerate(lens):
        if n == 0:
            assert torch.equal(got[i], torch.zeros_like(got[i]))  # an empty segment gives zeros


@needs_lib
def test_a_segment_does_not_depend_on_where_its_blocks_are_or_its_neighbours():
    """The same keys in consecutive blocks or scattered ones, alone or beside other segments: the same bits
    (a request's tokens must not depend on where the pool put its cache, or on who else decodes)."""
    gen = torch.Generator().manual_seed(7)
    lens, B, d, G = [1500, 77, 640], 16, 64, 3
    q, k_pool, v_pool, _, tables, lengths = _paged(gen, lens, B, d, G, shuffle=False)
    together = cpu_native.paged_decode_attention(lib, q, k_pool, v_pool, tables, lengths, 0.125)
    # move every block to a new random place
    perm = torch.randperm(k_pool.shape[0], generator=gen)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    moved = inverse[tables.long()].to(torch.int32)
    k2, v2 = k_pool[perm], v_pool[perm]
    scattered = cpu_native.paged_decode_attention(lib, q, k2, v2, moved, lengths, 0.125)
    assert torch.equal(together, scattered)
    for i in range(len(lens)):
        alone = cpu_native.paged_decode_attention(lib, q[i:i + 1], k_pool, v_pool, tables[i:i + 1], lengths[i:i + 1], 0.125)
        assert torch.equal(alone[0], together[i])


@needs_lib
def test_ops_route_cpu_decode_attention_to_the_c_kernel_and_other_dtypes_to_the_reference():
    from kvx.kernels import ops

    gen = torch.Generator().manual_seed(11)
    q, k_pool, v_pool, _, tables, lengths = _paged(gen, [300, 40], 16, 64, 3)
    out = ops.paged_decode_attention(q, k_pool, v_pool, tables, lengths, 0.125)
    assert torch.equal(out, cpu_native.paged_decode_attention(lib, q, k_pool, v_pool, tables, lengths, 0.125))
    half = ops.paged_decode_attention(q.bfloat16(), k_pool.bfloat16(), v_pool.bfloat16(), tables, lengths, 0.125)
    assert half.dtype == torch.bfloat16  # not the C kernel's: the reference ran
    assert (half.float() - out).abs().max().item() < 5e-2


def _fresh_python(env: dict, code: str) -> str:
    """Run `code` in a fresh interpreter (the library is loaded once per process) and return its stdout."""
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_without_a_compiler_or_with_kvx_native_0_everything_runs_on_pytorch(tmp_path):
    """No compiler (CC names nothing, a fresh cache) or KVX_NATIVE=0: no library, int8 weights stay plain,
    the product runs PyTorch's kernel and the summary says nothing of C kernels."""
    code = ("import torch; from kvx.kernels import cpu_native as c; from kvx.models.cpu_weights import Int8Weight;"
            "w = Int8Weight(torch.randn(8, 32)); y = w.linear(torch.randn(1, 32));"
            "print(c.library() is None, w.tiled, tuple(y.shape))")
    home = {"KVX_HOME": str(tmp_path / "home")}
    assert _fresh_python({**home, "CC": str(tmp_path / "no-such-compiler")}, code) == "True False (1, 8)"
    assert _fresh_python({**home, "KVX_NATIVE": "0"}, code) == "True False (1, 8)"
    assert not list((tmp_path / "home").glob("native/*.so"))  # nothing half-built left behind


@needs_lib
def test_the_library_is_built_once_and_reused(tmp_path):
    code = "from kvx.kernels import cpu_native as c; print(c.library() is not None)"
    home = {"KVX_HOME": str(tmp_path / "home")}
    assert _fresh_python(home, code) == "True"
    built = list((tmp_path / "home" / "native").glob("*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert _fresh_python(home, code) == "True"
    assert list((tmp_path / "home" / "native").glob("*.so")) == built  # loaded again, not rebuilt
    assert built[0].stat().st_mtime_ns == stamp


@needs_lib
def test_the_kernel_appends_the_steps_new_entries_as_the_reference_does():
    """new_entries: each segment's new token written at entry lengths - 1 before attending, in the same
    call; the pools afterwards equal reference.append_entries' and the output the reference's."""
    gen = torch.Generator().manual_seed(5)
    lens, d = [33, 16, 1, 200], 64
    q, k_pool, v_pool, pos_pool, tables, lengths = _paged(gen, lens, 16, d, 3)
    new = (torch.randn(len(lens), d, generator=gen), torch.randn(len(lens), d, generator=gen),
           torch.randint(0, 9999, (len(lens),), generator=gen))
    pools = [t.clone() for t in (k_pool, v_pool, pos_pool)]
    reference.append_entries(*pools, tables, lengths, *new)
    want = reference.paged_decode_attention(q, pools[0], pools[1], tables, lengths, 0.125)
    got = cpu_native.paged_decode_attention(lib, q, k_pool, v_pool, tables, lengths, 0.125, pos_pool=pos_pool,
                                            new_entries=new)
    for mine, theirs in zip((k_pool, v_pool, pos_pool), pools):
        assert torch.equal(mine, theirs)
    assert (got - want).abs().max().item() < 2e-5


@needs_lib
def test_a_layers_tail_in_one_call_equals_its_products_one_by_one():
    """cpu_native.layer_tail (o + residual, norm + gate|up, SiLU * up + down + residual, the next layer's
    norm + qkv) gives the bits of the four fused calls, and the unfused float64 arithmetic within float32's."""
    from kvx.models.cpu_weights import Int8Weight

    gen = torch.Generator().manual_seed(9)
    D, Ho, I, Nq, R, eps = 64, 48, 80, 96, 5, 1e-5
    mk = lambda n, k: Int8Weight(torch.randn(n, k, generator=gen) * 0.1)  # noqa: E731
    o, gu, down, qkv = mk(D, Ho), mk(2 * I, D), mk(D, I), mk(Nq, D)
    o_bias, qkv_bias = torch.randn(D, generator=gen), torch.randn(Nq, generator=gen)
    mlp_norm, attn_norm = torch.rand(D, generator=gen) + 0.5, torch.rand(D, generator=gen) + 0.5
    attn, x = torch.randn(R, Ho, generator=gen), torch.randn(R, D, generator=gen)
    x_out, heads = cpu_native.layer_tail(lib, attn, x, o, o_bias, mlp_norm, gu, down, eps, (attn_norm, qkv, qkv_bias))
    x1 = o.fused_linear(attn, o_bias, residual=x)
    x2 = down.fused_linear(gu.fused_linear(x1, None, norm=(mlp_norm, eps)), None, silu_mul=True, residual=x1)
    assert torch.equal(x_out, x2)
    assert torch.equal(heads, qkv.fused_linear(x2, qkv_bias, norm=(attn_norm, eps)))
    alone, none = cpu_native.layer_tail(lib, attn[2:3], x[2:3], o, o_bias, mlp_norm, gu, down, eps)
    assert none is None and torch.equal(alone, x_out[2:3])  # a row alone: the same bits
    # against plain float64 arithmetic on the dequantized weights
    W = {n: m.dequantized().double() for n, m in (("o", o), ("gu", gu), ("down", down), ("qkv", qkv))}
    rms = lambda t, g: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * g.double()  # noqa: E731
    r1 = x.double() + attn.double() @ W["o"].T + o_bias.double()
    g = rms(r1, mlp_norm) @ W["gu"].T
    r2 = r1 + (torch.nn.functional.silu(g[:, :I]) * g[:, I:]) @ W["down"].T
    assert (x_out.double() - r2).abs().max().item() < 1e-4 * r2.abs().max().item()
    want = rms(r2, attn_norm) @ W["qkv"].T + qkv_bias.double()
    assert (heads.double() - want).abs().max().item() < 1e-4 * want.abs().max().item()


@needs_lib
def test_the_portable_c_matches_the_reference_too(tmp_path):
    """Built for a CPU without AVX-512 (-march=x86-64: the plain C loops), the kernels give the reference's
    numbers as well, so a machine without AVX-512 runs them correctly."""
    code = """
import torch
from kvx.kernels import cpu_native as c, reference
lib = c.library()
assert lib is not None
g = torch.Generator().manual_seed(2)
q = torch.randint(-127, 128, (13, 45), dtype=torch.int8, generator=g); s = torch.rand(13, generator=g)
x = torch.randn(3, 45, generator=g)
y = c.int8_linear(lib, c.tile(q), s, x)
ref = (x.double() @ q.double().t()) * s.double()
assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
kp, vp = torch.randn(20, 8, 40, generator=g), torch.randn(20, 8, 40, generator=g)
tables = torch.randperm(20, generator=g)[:18].to(torch.int32).view(2, 9)
lengths = torch.tensor([70, 33], dtype=torch.int32); qq = torch.randn(2, 3, 40, generator=g)
a = c.paged_decode_attention(lib, qq, kp, vp, tables, lengths, 0.2)
b = reference.paged_decode_attention(qq, kp, vp, tables, lengths, 0.2)
assert (a - b).abs().max().item() < 2e-5
print("ok")
"""
    env = {"KVX_HOME": str(tmp_path / "home"), "KVX_NATIVE_ARCH": "x86-64"}
    assert _fresh_python(env, code) == "ok"


def test_where_a_c_compiler_exists_the_library_builds():
    """A compile error would silently send every user to PyTorch's kernels: where the machine has a C
    compiler (and KVX_NATIVE is not 0), the library must build — its errors are shown here if not."""
    import shutil

    if os.environ.get(cpu_native.ENV, "1") == "0" or shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler here, or KVX_NATIVE=0: PyTorch's kernels are the expected path")
    assert lib is not None, cpu_native.failure()

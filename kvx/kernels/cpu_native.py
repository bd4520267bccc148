"""kvx's C kernels for the CPU (cpu_native.c): built once per machine, loaded through ctypes.

The source is compiled on first use with the machine's C compiler (`$CC`, else `cc`) for the machine's own
instruction set (-march=native), and the library is kept in kvx's cache under a name that hashes the source,
the flags and the CPU's feature flags, so a cache shared between different machines never runs code built
for another CPU. Without a compiler, or with `KVX_NATIVE=0`, `library()` is None and every caller keeps its
PyTorch path: the C kernels are a speed-up, never a requirement (the summary line says which ran).

Nothing here is a Python extension module: the functions take raw pointers (`Tensor.data_ptr()`), so the
callers check dtypes, contiguity and shapes before calling (int8_linear below). The profiler does not see a
ctypes call as an operator: `kvx bench --breakdown` charges this module's entry points (int8_linear,
layer_tail, paged_decode_attention) by their Python frames (a record_function around the calls corrupted
torch.profiler's event names under with_stack=True).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

ENV = "KVX_NATIVE"
_SOURCE = Path(__file__).with_name("cpu_native.c")
# -ffp-contract=off: a*b+c stays two roundings wherever it is written, so the same sum written twice (the
# one-row and the many-row paths) gives the same bits.
_ARCH = os.environ.get("KVX_NATIVE_ARCH", "native")  # another -march (tests build the portable C this way)
_FLAGS = ["-O3", f"-march={_ARCH}", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11"]
_P = ctypes.c_void_p
_I = ctypes.c_int64

_loaded: list = []  # [library or None] once tried
_failure: list[str] = []  # why the build or the load failed, when it did


def failure() -> str | None:
    """Why the library did not build or load in this process (the compiler's messages), or None."""
    return _failure[-1] if _failure else None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(target: Path, compiler: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: another process loading it never sees a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
        # Builds of other versions of the source go (a process that still maps one keeps its copy open).
        for old in target.parent.glob("cpu_native-*.so"):
            if old != target:
                old.unlink(missing_ok=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load():
    from kvx.cache_home import cache_dir

    if os.environ.get(ENV, "1").strip().lower() in ("0", "off", "no", "false"):
        return None
    if platform.system() != "Linux":
        return None  # built and tested on Linux only
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), compiler.encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    target = cache_dir() / "native" / f"cpu_native-{key}.so"
    try:
        if not target.exists():
            _build(target, compiler)
        lib = ctypes.CDLL(str(target))
    except subprocess.CalledProcessError as exc:
        _failure.append(exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr))
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        _failure.append(str(exc))
        return None
    lib.kvx_int8_linear_fused.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _P, ctypes.c_float, ctypes.c_int, _P]
    lib.kvx_int8_linear_fused.restype = None
    lib.kvx_int8_layer_tail.argtypes = ([_P, _I, _P, _P, _I, _I, _I, _I] + [_P] * 8 + [ctypes.c_float]
                                        + [_P] * 4 + [_I, _P])
    lib.kvx_int8_layer_tail.restype = None
    lib.kvx_paged_decode.argtypes = [_P, _P, _P, _P, _I, _P, _I, _I, _I, _I, ctypes.c_float, _P, _P, _P, _P, _P,
                                     _I, _P, _P, _P, _P]
    lib.kvx_paged_decode.restype = None
    return lib


def library():
    """The loaded C library, or None where it cannot be built or KVX_NATIVE=0 turns it off."""
    if not _loaded:
        _loaded.append(_load())
    return _loaded[0]


def _tiles(n: int, rt: int, K: int) -> tuple[int, int]:
    """(bytes of n tiles of rt rows, bytes of their full 16-column groups per tile)."""
    return n * rt * K, rt * (K // 16) * 16


def tile(q: Tensor) -> Tensor:
    """An [N, K] int8 matrix in the order kvx_int8_linear reads it (cpu_native.c: 4 rows at a time, 16
    columns of each in turn, the last K % 16 columns after; the last tile may hold fewer rows): [N * K]."""
    N, K = q.shape
    parts = []
    for r0, rt in ((0, 4), (N - N % 4, N % 4)):
        n = (N - N % 4) // 4 if rt == 4 else (1 if rt else 0)
        if n == 0:
            continue
        block = q[r0:r0 + n * rt].reshape(n, rt, K)
        full = (K // 16) * 16
        groups = block[:, :, :full].reshape(n, rt, K // 16, 16).permute(0, 2, 1, 3).reshape(n, -1)
        parts.append(torch.cat([groups, block[:, :, full:].reshape(n, -1)], dim=1).reshape(-1))
    return torch.cat(parts).contiguous()


def untile(t: Tensor, N: int, K: int) -> Tensor:
    """tile's inverse: the plain [N, K] matrix (a copy), in PyTorch ops (a compiled graph can trace it)."""
    rows, at = [], 0
    full = (K // 16) * 16
    for rt in (4, N % 4):
        n = (N - N % 4) // 4 if rt == 4 else (1 if rt else 0)
        if n == 0:
            continue
        size, grouped = _tiles(n, rt, K)
        block = t[at:at + size].view(n, rt * K)
        at += size
        groups = block[:, :grouped].reshape(n, K // 16, rt, 16).permute(0, 2, 1, 3).reshape(n, rt, full)
        rows.append(torch.cat([groups, block[:, grouped:].reshape(n, rt, K - full)], dim=2).reshape(n * rt, K))
    return torch.cat(rows) if len(rows) > 1 else rows[0]


def int8_linear(lib, data: Tensor, scale: Tensor, x: Tensor, bias: Tensor | None = None, *,
                norm: tuple[Tensor, float] | None = None, silu_mul: bool = False,
                residual: Tensor | None = None) -> Tensor:
    """x [R, K] float32 @ (W [N, K] int8 * scale [N, 1]).T (+ bias) -> [R, N] float32, each row computed
    alone. data: W tiled (`tile`); scale (float32) and bias contiguous; x any [R, K] float32 view with unit
    stride. Fused neighbours of the product, computed per row in C: norm=(weight [K], eps) RMS-normalises x
    first; silu_mul: x is [R, 2K] (gate, up) and the product reads SiLU(gate) * up; residual [R, N]: added
    to the result."""
    R = x.shape[0]
    N = scale.shape[0]
    K = x.shape[1] // 2 if silu_mul else x.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(R, N, dtype=torch.float32)
    if residual is not None:
        residual = residual.contiguous()
    lib.kvx_int8_linear_fused(data.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr(),
                              x.data_ptr(), y.data_ptr(), R, N, K, x.stride(0), N,
                              None if norm is None else norm[0].data_ptr(), 0.0 if norm is None else float(norm[1]),
                              int(silu_mul), None if residual is None else residual.data_ptr())
    return y


def layer_tail(lib, attn: Tensor, x: Tensor, o, o_bias: Tensor | None, mlp_norm: Tensor, gate_up, down,
               eps: float, next_layer=None) -> tuple[Tensor, Tensor | None]:
    """The rest of a decoder layer after its attention, and the next layer's qkv product, in one call (one
    parallel region instead of four): x1 = x + attn @ o.T (+ o_bias); x_out = x1 + down(SiLU(gate) * up)
    with [gate | up] = gate_up(rms_norm(x1, mlp_norm)); next_layer = (attn_norm, qkv, qkv_bias): also
    rms_norm(x_out, attn_norm) @ qkv.T (+ qkv_bias). o, gate_up, down, qkv: tiled Int8Weights. The same
    products as int8_linear's fused calls, the same bits. Returns (x_out, next qkv product or None)."""
    R, D = x.shape
    I = down.shape[1]
    if attn.stride(1) != 1:
        attn = attn.contiguous()
    x = x.contiguous()
    out = torch.empty(R, D, dtype=torch.float32)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    if next_layer is not None:
        norm, qkv, qkv_bias = next_layer
        heads = torch.empty(R, qkv.shape[0], dtype=torch.float32)
        nxt = (norm.data_ptr(), qkv.data.data_ptr(), qkv.scale.data_ptr(), ptr(qkv_bias), qkv.shape[0], heads.data_ptr())
    else:
        heads, nxt = None, (None, None, None, None, 0, None)
    lib.kvx_int8_layer_tail(attn.data_ptr(), attn.stride(0), x.data_ptr(), out.data_ptr(), R, D, attn.shape[1], I,
                            o.data.data_ptr(), o.scale.data_ptr(), ptr(o_bias), mlp_norm.data_ptr(),
                            gate_up.data.data_ptr(), gate_up.scale.data_ptr(), down.data.data_ptr(),
                            down.scale.data_ptr(), float(eps), *nxt)
    return out, heads


_scratch = threading.local()  # each thread's logits buffer for the mass, reused across calls (grown as needed)


def paged_decode_attention(lib, q: Tensor, k_pool: Tensor, v_pool: Tensor, tables: Tensor, lengths: Tensor,
                           scale: float, *, mass_pool=None, mass_mode=None, pos_pool=None, q_pos=None,
                           sliding_window=None, new_entries=None) -> Tensor | None:
    """reference.paged_decode_attention in C, or None when the inputs are not what the kernel takes (float32
    pools and queries, int32 tables and lengths, int64 positions, on the CPU): the caller then runs the
    reference. Each segment's output depends only on its own keys, read in position order in chunks of a
    fixed size, so where the pool put its blocks and who its neighbours are do not change its bits.
    new_entries: (k [N, d], v [N, d], positions [N]) written first as each segment's last entry (reference
    .append_entries), nothing written when the call returns None."""
    if not (q.dtype == k_pool.dtype == v_pool.dtype == torch.float32 and tables.dtype == torch.int32
            and q.device.type == "cpu" and k_pool.is_contiguous() and v_pool.is_contiguous()):
        return None
    N, G, d = q.shape
    q = q.contiguous()
    lengths = lengths.to(torch.int32).contiguous()
    if tables.stride(1) != 1:
        tables = tables.contiguous()
    windowed = sliding_window is not None
    masses = mass_pool is not None and mass_mode is not None
    has_pos = pos_pool is not None and pos_pool.dtype == torch.int64 and pos_pool.is_contiguous()
    if (windowed and (not has_pos or q_pos is None)) or (new_entries is not None and not has_pos):
        return None
    if masses and (mass_pool.dtype != torch.float32 or not mass_pool.is_contiguous()):
        return None
    if new_entries is not None:
        k_new, v_new, pos_new = (t.contiguous() for t in new_entries)
        if not (k_new.dtype == v_new.dtype == torch.float32 and pos_new.dtype == torch.int64):
            return None
    qp = q_pos.to(torch.int64).contiguous() if windowed else None
    modes = mass_mode.to(torch.int32).contiguous() if masses else None
    out = torch.empty_like(q)
    buf = None
    if masses:  # the logits are kept for the mass: every length's bound (no pass over the lengths)
        need = max(N * tables.shape[1] * k_pool.shape[1] * G, 1)
        buf = getattr(_scratch, "logits", None)
        if buf is None or buf.numel() < need:
            buf = _scratch.logits = torch.empty(2 * need, dtype=torch.float32)
    lib.kvx_paged_decode(q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), tables.data_ptr(), tables.stride(0),
                         lengths.data_ptr(), N, G, d, k_pool.shape[1], float(scale), out.data_ptr(),
                         mass_pool.data_ptr() if masses else None, modes.data_ptr() if masses else None,
                         pos_pool.data_ptr() if has_pos else None, qp.data_ptr() if windowed else None,
                         int(sliding_window) if windowed else 0, None if buf is None else buf.data_ptr(),
                         *((k_new.data_ptr(), v_new.data_ptr(), pos_new.data_ptr()) if new_entries is not None
                           else (None,) * 3))
    return out

"""The compressed-context file (`.kvc`): safetensors, no pickle, about the kept bytes.

Tensors (per layer l): `k.l` / `v.l` `[Σ_h kept_h, d]` in the model's dtype, `pos.l` `[Σ_h kept_h]` int64,
optionally `mass.l` `[Σ_h kept_h]` float32 (H2O / TOVA); then `lengths` `[layers, kv heads]` int64,
optionally `head_budget` `[layers, kv heads]` int64 and `recent_q` `[layers, H, r, d]` (AhaKV).
`__metadata__` (strings): the format and its version, the context's next position, and `info`, a JSON
object (ContextInfo: fingerprints, dtype, policy, budget, question wrapping, token counts, kvx version).

A file is untrusted input. Everything is checked before a byte enters a pool: the format, version,
model, tokenizer and dtype, then every shape, length and position against the model's config and the
tensors' own sizes, so a truncated or tampered file is a one-line KvxError, never an out-of-bounds write.
Writing goes to a temporary file in the same folder, renamed into place once complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from kvx.errors import KvxError
from kvx.runtime.contexts.stored import ContextInfo, StoredContext

FORMAT = "kvx.context"
VERSION = 1
SUFFIX = ".kvc"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise KvxError(f"a stored context cannot hold {dtype}")


def save_context(stored: StoredContext, path: str | Path, extra: dict[str, str] | None = None) -> int:
    """Write `stored` to `path` (atomically); returns the file's size in bytes. `extra`: more metadata
    strings (a server records who owns the context)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {"lengths": torch.from_numpy(np.ascontiguousarray(stored.lengths, dtype=np.int64))}
    for layer in range(stored.num_layers):
        tensors[f"k.{layer}"] = stored.keys[layer].contiguous()
        tensors[f"v.{layer}"] = stored.values[layer].contiguous()
        tensors[f"pos.{layer}"] = stored.positions[layer].to(torch.int64).contiguous()
        if stored.mass is not None:
            tensors[f"mass.{layer}"] = stored.mass[layer].to(torch.float32).contiguous()
    if stored.head_budget is not None:
        tensors["head_budget"] = torch.tensor(stored.head_budget, dtype=torch.int64)
    if stored.recent_q is not None:
        tensors["recent_q"] = stored.recent_q.contiguous()
    info = dict(stored.info.__dict__)
    metadata = {"format": FORMAT, "version": str(VERSION), "position": str(stored.position),
                "info": json.dumps(info, sort_keys=True),
                "lengths_after_compress": json.dumps(stored.lengths_after_compress), **(extra or {})}
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for the half-written file only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def read_info(path: str | Path) -> tuple[dict, ContextInfo]:
    """(metadata, info) of a context file, reading only its header; KvxError if it is not one kvx reads."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise KvxError(f"context file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a bad header or a short file
        raise KvxError(f"{path} is not a readable context file ({_first_line(exc)})") from None
    if meta.get("format") != FORMAT:
        raise KvxError(f"{path} is not a kvx context file (made by `kvx compress`)")
    try:
        version = int(meta.get("version", ""))
    except ValueError:
        raise KvxError(f"{path}: its format version is unreadable") from None
    if version != VERSION:
        newer = "a newer" if version > VERSION else "an older"
        raise KvxError(f"{path} was written by {newer} kvx (context format {version}; this kvx reads {VERSION})")
    try:
        raw = json.loads(meta["info"])
        info = ContextInfo(**{k: raw[k] for k in ContextInfo.__dataclass_fields__ if k in raw})
    except (KeyError, TypeError, ValueError) as exc:
        raise KvxError(f"{path}: its metadata is damaged ({_first_line(exc)})") from None
    return meta, info


def weights_of(model, dtype: torch.dtype) -> str:
    """What a model's linear weights run as: a packed CPU format (models/cpu_weights.py) or its dtype."""
    return getattr(model, "weight_format", None) or dtype_name(dtype)


def check_compatible(path, info: ContextInfo, model_fingerprint: str, tokenizer_fingerprint: str,
                     dtype: torch.dtype, weights: str | None = None) -> None:
    """KvxError unless the file was made for this model, tokenizer, dtype (and weight format)."""
    if info.model_fingerprint != model_fingerprint:
        raise KvxError(f"{path} was compressed with another model (its fingerprint differs from this "
                       "model's); compress the context again with this --model")
    if info.tokenizer_fingerprint != tokenizer_fingerprint:
        raise KvxError(f"{path} was made with another tokenizer or chat template than this model's")
    if info.dtype != dtype_name(dtype):
        raise KvxError(f"{path} holds {info.dtype} keys and values; this model runs in {dtype_name(dtype)} "
                       f"(pass --dtype {info.dtype})")
    made_with = info.weights or info.dtype
    if weights is not None and made_with != weights:
        hint = (f"pass --dtype {made_with}" if made_with in _DTYPES else
                f"run with --dtype auto and KVX_CPU_WEIGHTS={made_with}")
        raise KvxError(f"{path} was compressed with {made_with} weights; this model runs {weights} weights ({hint})")


def load_context(path: str | Path, config, model_fingerprint: str, tokenizer_fingerprint: str,
                 dtype: torch.dtype, weights: str | None = None) -> StoredContext:
    """Read and check a context file for this model (see the module docstring). `weights`: the model's
    weight format (weights_of), checked against the file's when given."""
    from safetensors import safe_open

    path = Path(path)
    meta, info = read_info(path)
    check_compatible(path, info, model_fingerprint, tokenizer_fingerprint, dtype, weights)
    L, Hkv, H, d = config.num_layers, config.num_kv_heads, config.num_heads, config.head_dim

    def bad(what: str) -> KvxError:
        return KvxError(f"{path} is damaged or was tampered with: {what}")

    try:
        position = int(meta.get("position", ""))
        after = json.loads(meta.get("lengths_after_compress", "[]"))
    except ValueError:
        raise bad("its position is unreadable") from None
    if not 0 < position < config.max_position_embeddings or position != info.context_tokens:
        raise bad(f"position {position} does not fit the model's context ({config.max_position_embeddings})")
    expected = {"lengths", "head_budget", "recent_q"} | {f"{p}.{i}" for p in ("k", "v", "pos", "mass") for i in range(L)}
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if not names <= expected:
                raise bad(f"unexpected tensors {sorted(names - expected)[:3]}")
            t = {name: f.get_tensor(name) for name in names}
    except KvxError:
        raise
    except Exception as exc:  # noqa: BLE001 - a short or damaged file fails inside safetensors, in its own types
        raise bad(_first_line(exc)) from None

    lengths = t.get("lengths")
    if lengths is None or lengths.dtype != torch.int64 or tuple(lengths.shape) != (L, Hkv):
        raise bad(f"lengths must be int64 [{L}, {Hkv}] for this model")
    lengths = lengths.numpy().copy()
    if (lengths < 0).any() or (lengths > position).any():
        raise bad("a head's length is negative or longer than the context")
    has_mass = any(name.startswith("mass.") for name in names)
    keys, values, positions, masses = [], [], [], []
    for layer in range(L):
        n = int(lengths[layer].sum())
        k, v, pos = t.get(f"k.{layer}"), t.get(f"v.{layer}"), t.get(f"pos.{layer}")
        for name, x in ((f"k.{layer}", k), (f"v.{layer}", v)):
            if x is None or tuple(x.shape) != (n, d) or x.dtype != _DTYPES[info.dtype]:
                raise bad(f"{name} must be {info.dtype} [{n}, {d}]")
        if pos is None or pos.dtype != torch.int64 or tuple(pos.shape) != (n,):
            raise bad(f"pos.{layer} must be int64 [{n}]")
        start = 0
        for g in range(Hkv):
            seg = pos[start:start + int(lengths[layer, g])]
            start += seg.numel()
            if seg.numel() and (int(seg.min()) < 0 or int(seg.max()) >= position or bool((seg[1:] <= seg[:-1]).any())):
                raise bad(f"layer {layer} head {g}: positions outside [0, {position}) or out of order")
        if has_mass:
            m = t.get(f"mass.{layer}")
            if m is None or m.dtype != torch.float32 or tuple(m.shape) != (n,):
                raise bad(f"mass.{layer} must be float32 [{n}]")
            masses.append(m)
        keys.append(k)
        values.append(v)
        positions.append(pos)
    head_budget = t.get("head_budget")
    if head_budget is not None:
        if head_budget.dtype != torch.int64 or tuple(head_budget.shape) != (L, Hkv) or bool((head_budget < 0).any()):
            raise bad(f"head_budget must be non-negative int64 [{L}, {Hkv}]")
        head_budget = head_budget.tolist()
    recent_q = t.get("recent_q")
    if recent_q is not None and (recent_q.dim() != 4 or tuple(recent_q.shape[:2]) != (L, H) or recent_q.shape[3] != d):
        raise bad(f"recent_q must be [{L}, {H}, r, {d}]")
    if not (isinstance(after, list) and len(after) == L and all(isinstance(r, list) and len(r) == Hkv for r in after)):
        after = lengths.tolist()
    stored = StoredContext(keys=keys, values=values, positions=positions, lengths=lengths, position=position,
                           info=info, mass=masses if has_mass else None, head_budget=head_budget,
                           recent_q=recent_q, lengths_after_compress=after)
    _check_policy_state(path, stored)
    return stored


def _check_policy_state(path, stored: StoredContext) -> None:
    """The policy must be one this kvx knows, and a decode-time policy's state must be in the file."""
    try:
        policy, _ = stored.info.build_policy()
    except KvxError as exc:
        raise KvxError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise KvxError(f"{path}: its policy or budget is unreadable ({_first_line(exc)})") from None
    mode = None if policy is None else policy.decode_mode
    if mode in ("accumulate", "last") and stored.mass is None and stored.head_budget is not None:
        raise KvxError(f"{path} is damaged or was tampered with: {policy.name} needs each key's attention mass")
    if mode == "recent_queries" and stored.head_budget is not None and stored.recent_q is None:
        raise KvxError(f"{path} is damaged or was tampered with: {policy.name} needs its recent queries")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

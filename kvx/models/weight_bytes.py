"""The bytes a model's weights take: counted on a loaded model (`resident_weights`, what `kvx profile`
measures) and from a config alone (what runtime/memory.plan counts), for float32 and for the CPU's packed
formats (models/cpu_weights.py). The two agree to the byte (tests/test_profile.py)."""

from __future__ import annotations

from torch import Tensor

from kvx.models.cpu_weights import LINEAR_FIELDS


def resident_weights(model) -> tuple[int, int]:
    """(parameters as the checkpoint counts them, bytes the model holds for them): its torch parameters plus
    its packed matrices. A tied LM head's packed copy adds bytes (the float32 embedding stays), not
    parameters; an untied one replaced the float32 head."""
    params = {id(p): p for p in model.parameters()}
    count = sum(p.numel() for p in params.values()) - stacked_norm_copies(model.config)
    nbytes = sum(p.numel() * p.element_size() for p in params.values())
    for w in model._layer_weights:
        for f in LINEAR_FIELDS:
            packed = getattr(w, f)
            if not isinstance(packed, Tensor):
                count, nbytes = count + packed.numel, nbytes + packed.nbytes
    head = model._head
    if not isinstance(head, Tensor):
        nbytes += head.nbytes
        if model.lm_head is None:
            count += head.numel
    return count, nbytes


def stacked_norm_copies(cfg) -> int:
    """Elements the model holds beyond the checkpoint's parameters: Qwen3's q and k norms (a vector each per
    layer) are stored repeated over the heads (transformer.DecoderLayer.qk_norm), to normalise every head in
    one op."""
    return cfg.num_layers * (cfg.num_heads + cfg.num_kv_heads - 2) * cfg.head_dim if cfg.qk_norm else 0


def packed_bytes_per_element(fmt: str) -> tuple[int, int]:
    """(bytes per matrix element, bytes per output row) of a packed format (w8a8's per-column smoothing
    factors aside): what runtime/memory.plan counts without building anything."""
    return {"int8": (1, 4), "bfloat16": (2, 0), "w8a8": (2, 4)}[fmt]

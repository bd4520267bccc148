"""Decode-time eviction, one segment at a time: policies with a decode mode (H2O, TOVA, StreamingLLM,
AhaKV) keep every (layer, kv head) at its budget while generating.

This is the reference: each due segment asks its policy's decode_keep. The engine evicts through
batch_eviction.py, which ranks every due segment of a batch in one pass with the same choice, and comes
here only for a scorer without a batched rule (Policy.decode_rule)."""

from __future__ import annotations

import torch

from kvx.runtime.engine.state import SequenceState

# Tokens a decode-time policy may exceed its budget by before it evicts: evicting in small batches keeps
# the per-step cost low while the cache stays within budget + DECODE_SLACK.
DECODE_SLACK = 16


@torch.inference_mode()  # compact_layer may update the cache's (inference) tensors in place
def evict_per_segment(engine, req: SequenceState) -> None:
    """Bring req's segments back to budget a segment at a time through Policy.decode_keep: for a policy
    without a batched rule (decode_rule), and the reference the ranked passes are tested against."""
    from kvx.policies import (
        DecodeView,  # local: policies are only needed when a policy runs
    )

    cache = req.cache
    G = engine.group
    for layer, lc in enumerate(cache.layers):
        targets = req.head_budget[layer]
        if all(n <= t + DECODE_SLACK - 1 for n, t in zip(lc.lengths, targets)):
            continue
        keep = []
        for g in range(cache.num_kv_heads):
            n, target = lc.lengths[g], targets[g]
            if n <= target:
                keep.append(torch.arange(n, device=engine.device))
                continue
            rq = req.recent_q[layer]
            view = DecodeView(
                positions=lc.head_positions(g), key_mass=lc.head_mass(g), load_kv=lambda g=g: lc.head(g)[:2],
                recent_queries=None if rq is None else rq[g * G:(g + 1) * G],
                query_position=req.position - 1, head_dim=engine.config.head_dim, scale=engine.scale)
            keep.append(req.policy.decode_keep(view, target))
        cache.compact_layer(layer, keep, DECODE_SLACK)

"""Task-free fidelity: how far a compressed cache moves the model from its full-cache behaviour.

For a prompt and a continuation, the prompt is prefilled once and compressed with the policy; then the
continuation is fed token by token (teacher forcing) through the full request and the compressed one, and
at each step the next-token distributions are compared:

- KL(full || compressed) of the next-token distributions, in nats;
- top-1 agreement: both pick the same most likely token.

Per-layer error of the attention output is measured in isolation, so that a layer is charged for its own
cache only: a shadow copy of the compressed cache attends with the *full* run's queries, keys and values
at every layer and step, and ||o_shadow - o_full|| / ||o_full|| is reported per layer over all the
continuation's queries. (Comparing the two runs' outputs directly would mix in the drift of the hidden
states coming from the layers below.)

While feeding the continuation, requests whose policy evicts during decoding (H2O, TOVA, AhaKV) do so
exactly as a decode step does, so the metrics describe what generation would see.

On tensor-parallel ranks every rank holds the whole logits (the KL and top-1 are the same on each) and
measures the attention error of its own query heads; the per-layer sums are added over the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvx.eval.prefill import SharedPrefill
from kvx.runtime.cache.pool import DEFAULT_BLOCK_SIZE, BlockPool
from kvx.runtime.engine.sampling import SamplingParams


@dataclass
class FidelityResult:
    kl: list[float]  # per continuation token: KL(full || compressed) of the next-token distributions
    top1: list[bool]  # per continuation token: same argmax
    layer_rel_error: list[float] = field(default_factory=list)  # per layer, over all continuation queries

    @property
    def mean_kl(self) -> float:
        return sum(self.kl) / len(self.kl) if self.kl else 0.0

    @property
    def max_kl(self) -> float:
        return max(self.kl, default=0.0)

    @property
    def top1_agreement(self) -> float:
        return sum(self.top1) / len(self.top1) if self.top1 else 1.0

    def to_dict(self) -> dict:
        return {
            "kl": round(self.mean_kl, 6),
            "max_kl": round(self.max_kl, 6),
            "top1": round(self.top1_agreement, 6),
            "layer_rel_error": [round(e, 6) for e in self.layer_rel_error],
        }


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> float:
    """KL(p || q) in nats for two logit vectors [V], computed in float64."""
    log_p = torch.log_softmax(logits_p.double(), dim=-1)
    log_q = torch.log_softmax(logits_q.double(), dim=-1)
    # Clamp at 0: for identical inputs rounding can give -1e-17.
    return max(0.0, float((log_p.exp() * (log_p - log_q)).sum()))


def measure_fidelity(engine, prompt_ids: list[int], continuation: list[int], policy, budget) -> FidelityResult:
    """Prefill `prompt_ids`, compress a copy with (policy, budget), teacher-force `continuation` through both."""
    shared = SharedPrefill(engine, prompt_ids, [(policy, budget)])
    return compare_on_continuation(engine, shared, continuation, policy, budget)


def compare_on_continuation(engine, shared: SharedPrefill, continuation: list[int], policy, budget) -> FidelityResult:
    """Fidelity of (policy, budget) against the full cache, from an existing shared prefill."""
    from kvx.runtime.compression.batch_eviction import evict_due
    from kvx.runtime.engine.attend import make_attend

    m = len(continuation)
    engine.check_length(shared.n + m)
    cfg = engine.config
    # The three caches (full, compressed, the compressed shadow) in one pool of their own, each compressed
    # from the shared prefill with room for the whole continuation.
    segments = cfg.num_layers * cfg.num_kv_heads
    pool = BlockPool(3 * segments * -(-(shared.n + m) // DEFAULT_BLOCK_SIZE), DEFAULT_BLOCK_SIZE, cfg.head_dim,
                     engine.dtype, engine.device)
    full = shared.fork()
    compressed = shared.fork(policy, budget)
    shadow = shared.fork(policy, budget)
    for req in (full, compressed, shadow):
        engine.compress(req, headroom=m, pool=pool)

    L = cfg.num_layers
    err_sq = [0.0] * L
    ref_sq = [0.0] * L

    def beside_full(attend):
        """The full run's attend, with the shadow cache attending to the same q, k, v at every layer."""
        shadow_attend = make_attend(engine, shadow, None)

        def both(layer, q, k, v, positions, q_pre):
            out = attend(layer, q, k, v, positions, q_pre)
            out_shadow = shadow_attend(layer, q, k, v, positions, q_pre)
            err_sq[layer] += float((out_shadow.float() - out.float()).square().sum())
            ref_sq[layer] += float(out.float().square().sum())
            return out

        return both

    kl, top1 = [], []
    for tok in continuation:
        shadow.cache.make_room(1)
        logits_full = engine.forward(full, [tok], wrap=beside_full)
        shadow.position += 1
        logits_comp = engine.forward(compressed, [tok])
        # Decode-time policies evict as generation would.
        evict_due(engine, [r for r in (compressed, shadow) if r.evicts_while_decoding])
        kl.append(kl_divergence(logits_full, logits_comp))
        top1.append(int(torch.argmax(logits_full)) == int(torch.argmax(logits_comp)))
    tp = getattr(engine.model, "tp", None)
    if tp is not None:  # each rank measured its own query heads' outputs: the model's error is the sum's
        sums = tp.all_reduce(torch.tensor(err_sq + ref_sq, dtype=torch.float64, device=tp.device)).tolist()
        err_sq, ref_sq = sums[:L], sums[L:]
    rel = [(e / r) ** 0.5 if r > 0 else 0.0 for e, r in zip(err_sq, ref_sq)]
    return FidelityResult(kl=kl, top1=top1, layer_rel_error=rel)


def greedy_continuation(engine, prompt_ids: list[int], n_tokens: int) -> list[int]:
    """The full cache's greedy continuation of `prompt_ids` (a natural continuation to teacher-force)."""
    from kvx.runtime.engine.batch_engine import generate

    engine.check_length(len(prompt_ids) + n_tokens)
    return generate(engine, prompt_ids, SamplingParams(), n_tokens, policy=None, budget=None,
                    stop_at_eos=False).token_ids

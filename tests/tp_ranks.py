"""What the tensor-parallel tests run on every rank (a module the spawned ranks can import).

`run_cases(tp, cases)` runs each case (a model folder, a policy, a budget, prompts) through the one engine
(BatchEngine: the prompts as one batch) and records, after every step, every running sequence's kept
positions per (layer, kv head): on a tensor-parallel rank its own heads, gathered into the whole model's
on rank 0 (a replicated head must be the same on every rank that holds it). With tp None it is one device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kvx.models.transformer import Transformer
from kvx.policies import build_policy, parse_budget
from kvx.runtime.engine.batch_engine import BatchEngine
from kvx.runtime.engine.model_runner import ModelRunner
from kvx.runtime.engine.sequence import GenerationRequest


class StubTokenizer:
    """Decodes to nothing; encodes KVzip's reconstruction prompts as fixed ids (one token per character)."""

    eos_token_ids: list[int] = []
    has_chat_template = False

    def decode(self, ids):
        return ""

    def encode(self, text, add_special_tokens=False):
        return [3 + ord(c) % 120 for c in text][:12]


def load(path, tp):
    if tp is None:
        return Transformer.from_pretrained(path)
    from kvx.models.sharding import load_sharded

    model, _ = load_sharded(path, tp.rank, tp.world, tp, tokenizer=False)
    return model


def _kept(seqs) -> dict[int, list[list[list[int]]]]:
    out = {}
    for i, s in enumerate(seqs):
        if s.req is not None and not s.done:
            cache = s.req.cache
            out[i] = [[lc.head_positions(g).tolist() for g in range(cache.num_kv_heads)] for lc in cache.layers]
    return out


def _whole(tp, model, kept: dict) -> dict:
    """Every rank's heads, in the full model's order (rank 0's answer; None elsewhere)."""
    from kvx.models.sharding import shard_for

    parts = [None] * tp.world
    dist.all_gather_object(parts, kept)
    shards = [shard_for(model.full_config, r, tp.world) for r in range(tp.world)]
    out = {}
    for i in parts[0]:
        layers = []
        for layer in range(len(parts[0][i])):
            heads = []
            for h in range(model.full_config.num_kv_heads):
                copies = [parts[r][i][layer][h - s.kv_lo] for r, s in enumerate(shards) if s.kv_lo <= h < s.kv_hi]
                assert all(c == copies[0] for c in copies), "a replicated kv head differs between ranks"
                heads.append(copies[0])
            layers.append(heads)
        out[i] = layers
    return out


def run_case(tp, model, policy, budget, prompts, max_tokens, max_batch=8):
    runner = ModelRunner(model, StubTokenizer())
    batch = BatchEngine(runner, kv_memory=16 << 20, max_batch=max_batch)
    seqs = []
    for ids, name, b in zip(prompts, policy, budget):
        policy_name, _, allocation = name.partition("@")  # "snapkv@global": another allocator
        pol = None if name == "full" else build_policy(policy_name, allocation=allocation or None)
        seqs.append(batch.submit(GenerationRequest(prompt_ids=list(ids), max_tokens=max_tokens, policy=pol,
                                                   budget=None if b is None else parse_budget(b))))
    steps = []
    held = [0] * len(seqs)  # the most bytes each sequence's cache on this rank held after a step
    while batch.has_work:
        batch.step()
        kept = _kept(seqs)
        steps.append(kept if tp is None else _whole(tp, model, kept))
        for i, s in enumerate(seqs):
            if s.req is not None and not s.done:
                held[i] = max(held[i], s.req.cache.bytes_allocated())
    tokens = [s.results[0].token_ids if s.results else s.error for s in seqs]
    if tp is not None:  # every rank's bytes, measured from its own cache
        parts = [None] * tp.world
        dist.all_gather_object(parts, held)
        held = parts
    whole = [s.results[0].kv_bytes_held if s.results else None for s in seqs]  # the result's whole-model figure
    return {"tokens": tokens, "kept": steps, "kv_bytes_held": held, "result_kv_bytes_held": whole}


def run_cases(tp, cases):
    """cases: [(model folder, [policy per prompt], [budget per prompt], [prompt ids], max_tokens)]."""
    torch.manual_seed(0)
    models, out = {}, []
    for path, policies, budgets, prompts, max_tokens in cases:
        if path not in models:
            models[path] = load(path, tp)
        out.append(run_case(tp, models[path], policies, budgets, prompts, max_tokens))
    return out


def weight_bytes(tp, path):
    """(bytes of every tensor the rank's model holds, of its replicated embedding / head), measured from
    the storages it holds (a tied head counted once); on a tensor-parallel rank, every rank's pair."""
    model = load(path, tp)
    seen, total = set(), 0
    for p in model.parameters():
        st = p.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    replicated = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (model.embed, model.lm_head)}
    pair = (total, sum(replicated.values()))
    if tp is None:
        return pair
    parts = [None] * tp.world
    dist.all_gather_object(parts, pair)
    return parts


def run_schedule(tp, path, events, kv_memory, max_batch=8):
    """Requests arriving and leaving at given steps, as a server sees them: events is [(step, 'submit', name,
    prompt, policy, budget, max_tokens) or (step, 'cancel', name)]. Rank 0 drives its BatchEngine (wrapped in
    a LeaderBatch on ranks); the other ranks only follow. Returns each request's tokens (rank 0)."""
    from kvx.runtime.parallel.plan import LeaderBatch, follow

    model = load(path, tp)
    batch = BatchEngine(ModelRunner(model, StubTokenizer()), kv_memory=kv_memory, max_batch=max_batch)
    if tp is not None and tp.rank != 0:
        follow(batch, tp)
        return None
    if tp is not None:
        batch = LeaderBatch(batch, tp)
    seqs, step, most_waiting = {}, 0, 0
    last = max(e[0] for e in events)
    while step <= last or batch.has_work:
        for event in events:
            if event[0] != step:
                continue
            if event[1] == "submit":
                _, _, name, ids, policy, budget, max_tokens = event
                pol = None if policy == "full" else build_policy(policy)
                seqs[name] = batch.submit(GenerationRequest(prompt_ids=list(ids), max_tokens=max_tokens, policy=pol,
                                                            budget=None if budget is None else parse_budget(budget)))
            else:
                batch.cancel(seqs[event[2]])
        if batch.has_work:
            batch.step()
        most_waiting = max(most_waiting, len(batch.scheduler.waiting))
        step += 1
    if tp is not None:
        batch.close()
    return {"tokens": {n: (s.results[0].token_ids if s.results else (s.state, len(s.out_ids))) for n, s in seqs.items()},
            "most_waiting": most_waiting}


def stall_rank_1(tp):
    """Rank 1 stays alive but stops answering; rank 0 waits in an all-reduce."""
    import time

    if tp.rank == 1:
        time.sleep(120)
    tp.all_reduce(torch.ones(3))
    return "done"


def fail_rank_1_before_any_collective(tp):
    """Rank 1 fails while it starts (before its first collective); rank 0 waits for it in an all-reduce."""
    if tp.rank == 1:
        raise RuntimeError("model.safetensors: no such file on this rank")
    tp.all_reduce(torch.ones(3))
    return "done"


def packed_int8(tp, path):
    """Every layer's int8 weights and scales (models/cpu_weights.py) as this rank packs them (one device's
    when tp is None), with the rank's shard; on ranks, every rank's."""
    from kvx.models.cpu_weights import pack

    model = load(path, tp)
    pack(model, "int8")
    layers = [{f: (getattr(w, f).q.clone(), getattr(w, f).scale.clone()) for f in ("qkv", "o", "gate_up", "down")}
              for w in model._layer_weights]
    mine = (layers, model.shard)
    if tp is None:
        return mine
    parts = [None] * tp.world
    dist.all_gather_object(parts, mine)
    return parts

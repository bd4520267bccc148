"""KVzip: reconstruction scores against a dense reference, chunking, no trace in the cache, budgets, and
question-agnostic answering of several questions from one compressed context."""

from __future__ import annotations

import math

import pytest
import torch

from checkpoints import make_checkpoint
from kvx.errors import KvxError
from kvx.kernels.stats import col_max_over_rows
from kvx.models.transformer import Transformer
from kvx.policies import build_policy, parse_budget
from kvx.policies.kvzip import FIRST_PROMPT, NEXT_PROMPT
from kvx.runtime.engine.model_runner import ModelRunner
from kvx.runtime.compression.reconstruction import plan_passes, reconstruction_stats, template_parts
from kvx.runtime.engine.sampling import SamplingParams
from test_engine import StubTokenizer
from kvx.runtime.engine.batch_engine import generate_agnostic
from runtime_helpers import new_request

FIRST_IDS = [5, 6, 7]
NEXT_IDS = [8, 9]
SUFFIX_IDS = [10]


class ReconstructionTokenizer(StubTokenizer):
    """test_engine's stub, plus the ids of the reconstruction prompts on a tiny checkpoint."""

    has_chat_template = False

    def encode(self, text, add_special_tokens=False):
        return {FIRST_PROMPT: FIRST_IDS, NEXT_PROMPT: NEXT_IDS, "\n": SUFFIX_IDS}[text]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_checkpoint("llama_gqa_llama3", tmp_path_factory.mktemp("kvzip"))
    return Transformer.from_pretrained(path)


def context_ids(n=40, seed=3):
    return torch.randint(11, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prefilled(engine, ids, policy, budget):
    req = new_request(engine, capacity=len(ids), policy=policy, budget=budget)
    engine.prefill(req, ids)
    return req


PREFIX_IDS = [1, 2, 3, 4, 2, 3]  # a chat template's prefix, longer than the 4 default sinks
TEMPLATE_SUFFIX_IDS = [10, 4]


class TemplateTokenizer(ReconstructionTokenizer):
    """A tokenizer with a chat template: '<p>' + the user's turn + '<s>'."""

    has_chat_template = True

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "<p>" + messages[-1]["content"] + "<s>"

    def encode(self, text, add_special_tokens=False):
        return {"<p>": PREFIX_IDS, "<s>": TEMPLATE_SUFFIX_IDS}.get(text) or super().encode(text)


def dense_reference(model, ids, chunk, cue, sinks, tokenizer=None):
    """[L, H, n] col max, computed the plain way: per pass, one forward over context + pass ids with full
    causal softmax attention; then each pass's queries, softmax over the first `sinks` tokens + chunk +
    their own keys as one dense matrix, max over the queries. Chunks start after the template's prefix."""
    cfg = model.config
    n = len(ids)
    scale = cfg.head_dim ** -0.5
    G = cfg.num_heads // cfg.num_kv_heads
    prefix, suffix, first, nxt = template_parts(tokenizer or ReconstructionTokenizer())
    plan = plan_passes(ids, prefix, suffix, first, nxt, chunk, cue)
    out = torch.zeros(cfg.num_layers, cfg.num_heads, n)
    for pass_ids, start, end in plan.passes:
        seq = ids + pass_ids
        T = len(pass_ids)
        captured = {}

        def attend(layer, q, k, v, positions, q_pre):
            captured[layer] = (q, k)
            kk = k.repeat_interleave(G, dim=0)
            vv = v.repeat_interleave(G, dim=0)
            logits = q @ kk.transpose(-1, -2) * scale
            mask = torch.ones(len(seq), len(seq), dtype=torch.bool).tril()
            return torch.softmax(logits.masked_fill(~mask, -math.inf), -1) @ vv

        with torch.inference_mode():
            model(torch.tensor(seq), torch.arange(len(seq)), attend)
        s = min(sinks, start)
        keys = list(range(s)) + list(range(start, end)) + list(range(n, n + T))
        for layer, (q, k) in captured.items():
            qr = q[:, n:]  # [H, T, d]
            ks = k[:, keys].repeat_interleave(G, dim=0)  # [H, S, d]
            logits = qr @ ks.transpose(-1, -2) * scale
            own = torch.ones(T, T, dtype=torch.bool).tril()
            mask = torch.cat([torch.ones(T, s + end - start, dtype=torch.bool), own], dim=1)
            p = torch.softmax(logits.masked_fill(~mask, -math.inf), -1).amax(dim=1)  # [H, S]
            out[layer, :, :s] = torch.maximum(out[layer, :, :s], p[:, :s])
            out[layer, :, start:end] = torch.maximum(out[layer, :, start:end], p[:, s:s + end - start])
    return out


@pytest.mark.parametrize("chunk,cue,sinks", [(16, 3, 2), (40, 8, 4), (7, 0, 0)])
def test_scores_equal_a_dense_reference(tiny, chunk, cue, sinks):
    ids = context_ids()
    engine = ModelRunner(tiny, ReconstructionTokenizer())
    policy = build_policy("kvzip", args={"chunk": str(chunk), "cue": str(cue), "sinks": str(sinks)})
    req = prefilled(engine, ids, policy, parse_budget("25%"))
    got = torch.stack([st.col_max for st in req.stats])
    want = dense_reference(tiny, ids, chunk, cue, sinks)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert float(got[:, :, sinks:].min()) > 0  # every context entry got a score from its chunk's pass
    # The score the policy ranks by: max over the group's query heads.
    G = tiny.config.num_heads // tiny.config.num_kv_heads
    ctx_scores = policy.scorer.score(req.stats[1], _ctx(tiny, len(ids)))
    torch.testing.assert_close(ctx_scores, want[1].reshape(-1, G, len(ids)).amax(1))


def _ctx(model, n):
    from kvx.policies.base import ScoreContext

    cfg = model.config
    return ScoreContext(layer=1, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                        num_heads=cfg.num_heads, head_dim=cfg.head_dim, lo=0, hi=n, per_head=n / 4)


def test_one_chunk_covering_the_context_equals_the_default_chunk(tiny):
    ids = context_ids()
    engine = ModelRunner(tiny, ReconstructionTokenizer())
    scores = []
    for chunk in (len(ids), 2048):
        req = prefilled(engine, ids, build_policy("kvzip", args={"chunk": str(chunk)}), parse_budget("25%"))
        scores.append(torch.stack([st.col_max for st in req.stats]))
    torch.testing.assert_close(scores[0], scores[1], rtol=0, atol=0)
    # and one pass is the plain softmax over the whole context and the pass's own keys
    torch.testing.assert_close(scores[0], dense_reference(tiny, ids, len(ids), 8, 4), rtol=1e-4, atol=1e-6)


def test_the_template_prefix_is_kept_whole_as_the_sinks(tiny):
    """As the authors' code: the chat template's prefix is the scoring softmax's sinks and is never evicted;
    keep_prefix=false is kvpress's way (4 sinks, the rest of the prefix unscored)."""
    tok = TemplateTokenizer()
    assert template_parts(tok)[0] == PREFIX_IDS and template_parts(tok)[1] == TEMPLATE_SUFFIX_IDS
    ids = PREFIX_IDS + context_ids(50)
    p = len(PREFIX_IDS)
    engine = ModelRunner(tiny, tok)
    cfg = tiny.config
    for keep, sinks in ((True, p), (False, 4)):
        policy = build_policy("kvzip", args={"chunk": "16", "keep_prefix": str(keep).lower()})
        req = prefilled(engine, ids, policy, parse_budget("20%"))
        got = torch.stack([st.col_max for st in req.stats])
        torch.testing.assert_close(got, dense_reference(tiny, ids, 16, 8, sinks, tok), rtol=1e-4, atol=1e-6)
        assert int(got[:, :, sinks:p].count_nonzero()) == 0  # kvpress: the prefix past the sinks is unscored
        assert float(got[:, :, p:].min()) > 0
        engine.compress(req, headroom=0)
        assert req.cache.total_entries() == parse_budget("20%").total_entries(len(ids), cfg.num_layers,
                                                                             cfg.num_kv_heads)
        for lc in req.cache.layers:
            for g in range(cfg.num_kv_heads):
                pos = lc.head(g)[2]
                assert pos[:sinks].tolist() == list(range(sinks))  # the sinks are kept in every head
        if not keep:  # the unscored prefix tokens go first: none of them survives a 20% budget here
            kept = torch.cat([lc.head(g)[2] for lc in req.cache.layers for g in range(cfg.num_kv_heads)])
            assert not bool(((kept >= 4) & (kept < p)).any())


def test_col_max_is_chunked_over_rows_without_changing_it(monkeypatch):
    import kvx.kernels.stats as stats

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 300, 8, generator=g), torch.randn(2, 360, 8, generator=g)
    q_pos, k_pos = torch.arange(60, 360), torch.arange(360)
    w = torch.rand(300, generator=g) + 0.5
    whole = col_max_over_rows(q, k, q_pos, k_pos, 0.3, w)
    monkeypatch.setattr(stats, "ROW_CHUNK", 7)
    monkeypatch.setattr(stats._RowSource, "chunks",
                        lambda self, first: ((t, min(self.num_rows, t + 7)) for t in range(first, self.num_rows, 7)))
    torch.testing.assert_close(col_max_over_rows(q, k, q_pos, k_pos, 0.3, w), whole)
    logits = (q.view(2, 2, 300, 8) @ k.transpose(-1, -2).unsqueeze(1)) * 0.3
    logits = logits.masked_fill(k_pos[None, :] > q_pos[:, None], -math.inf)
    dense = (torch.softmax(logits, -1) * w.view(1, 1, -1, 1)).amax(2).reshape(4, 360)
    torch.testing.assert_close(whole, dense)


def test_reconstruction_leaves_no_trace_in_the_cache(tiny):
    ids = context_ids(48)
    engine = ModelRunner(tiny, ReconstructionTokenizer())
    plain = new_request(engine, capacity=len(ids))
    engine.prefill(plain, ids)
    budget = parse_budget("30%")
    req = prefilled(engine, ids, build_policy("kvzip", args={"chunk": "20"}), budget)
    assert req.position == len(ids)
    for lc, ref in zip(req.cache.layers, plain.cache.layers):  # the passes wrote nothing
        assert lc.lengths == ref.lengths
        assert torch.equal(lc.dense()[0], ref.dense()[0]) and torch.equal(lc.dense()[1], ref.dense()[1])
    engine.compress(req, headroom=0)
    cfg = tiny.config
    assert req.cache.total_entries() == budget.total_entries(len(ids), cfg.num_layers, cfg.num_kv_heads)
    for lc, ref in zip(req.cache.layers, plain.cache.layers):
        K, V, P = ref.dense()
        for g in range(cfg.num_kv_heads):
            k, v, pos = lc.head(g)
            assert bool((pos < len(ids)).all())  # only context positions
            assert torch.equal(k, K[g, pos]) and torch.equal(v, V[g, pos])  # bit for bit the context's
            assert bool((pos[: min(4, len(pos))] == torch.arange(min(4, len(pos)))).all())  # sinks kept


@pytest.mark.parametrize("budget", ["10%", "25%", "50%", "12"])
def test_budgets_hold_in_bytes(tiny, budget):
    ids = context_ids(64)
    engine = ModelRunner(tiny, ReconstructionTokenizer())
    b = parse_budget(budget)
    cfg = tiny.config
    for spec in ({}, {"plus": "true"}):
        req = prefilled(engine, ids, build_policy("kvzip", args=spec), b)
        engine.compress(req, headroom=0)
        total = b.total_entries(len(ids), cfg.num_layers, cfg.num_kv_heads)
        assert req.cache.total_entries() == total
        assert req.cache.bytes_used() == total * engine.entry_bytes()
        pool = req.cache.pool  # and the cache holds only the blocks those entries need
        blocks = sum(-(-n // pool.block_size) for layer in req.cache.lengths() for n in layer)
        assert req.cache.bytes_allocated() == blocks * pool.block_bytes
    # per layer (kvpress's layerwise): every layer the same total
    req = prefilled(engine, ids, build_policy("kvzip", allocation="ada", args={"alpha": "0"}), b)
    engine.compress(req, headroom=0)
    totals = [sum(layer) for layer in req.cache.lengths()]
    assert max(totals) - min(totals) <= cfg.num_kv_heads
    assert req.cache.total_entries() == b.total_entries(len(ids), cfg.num_layers, cfg.num_kv_heads)


def test_model_wide_selection_ranks_raw_scores(tiny):
    """One top-K over every layer's raw scores: every kept candidate scores at least every dropped one."""
    ids = context_ids(64)
    engine = ModelRunner(tiny, ReconstructionTokenizer())
    req = prefilled(engine, ids, build_policy("kvzip"), parse_budget("20%"))
    cfg = tiny.config
    G = cfg.num_heads // cfg.num_kv_heads
    scores = [st.col_max.reshape(cfg.num_kv_heads, G, -1).amax(1) for st in req.stats]
    keep = req.policy.select(list(req.stats), req.budget, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim)
    kept, dropped = [], []
    for layer, idxs in enumerate(keep):
        for g, idx in enumerate(idxs):
            mask = torch.zeros(len(ids), dtype=torch.bool)
            mask[idx] = True
            mask[:4] = False  # sinks are protected, not ranked
            s = scores[layer][g]
            kept.append(s[mask])
            dropped.append(s[4:][~mask[4:]])
    assert float(torch.cat(kept).min()) >= float(torch.cat(dropped).max())


def test_chunked_prefill_and_a_compressed_cache_are_refused(tiny):
    ids = context_ids(64)
    engine = ModelRunner(tiny, ReconstructionTokenizer(), prefill_chunk=16)
    with pytest.raises(KvxError, match="prefill-chunk"):
        generate_agnostic(engine, ids, [[11, 12]], SamplingParams(), 2, policy=build_policy("kvzip"),
                                 budget=parse_budget("20%"))
    engine = ModelRunner(tiny, ReconstructionTokenizer())
    req = new_request(engine, capacity=len(ids))
    engine.prefill(req, ids)
    req.position += 1  # a cache that is not exactly this context
    with pytest.raises(KvxError, match="whole context"):
        reconstruction_stats(engine, req, ids, request=build_policy("kvzip").request)


def test_registered_and_documented():
    from kvx.policies import describe_policies

    info = {p.name: p for p in describe_policies()}["kvzip"]
    assert info.paper.startswith("2505.23416")
    assert info.allocation == "global"
    opts = {name: default for name, default, _ in info.options}
    assert opts["sinks"] == "4" and opts["chunk"] == "2048" and opts["cue"] == "8" and opts["plus"] == "false"
    assert opts["keep_prefix"] == "true"
    assert opts["normalize"] == "False" or opts["normalize"] == "false"


# --------------------------------------------------------------------------------------------------------
# The default model: several questions from one KVzip-compressed context
# --------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_agnostic_answers_several_questions_from_one_kvzip_context():
    from kvx.eval import tasks
    from kvx.models import load_model
    from kvx.models.hub import pull_default_model
    from kvx.options import split_context_question

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = load_model(pull_default_model(quiet=True))
        sample = tasks.generate("passkey", tok, 1000, seed=0)
        questions = ["What is the pass key? Answer with the number only.",
                     "What color is the sky? Answer in one word.",
                     "What is the pass key? Answer with the number only."]
        parts = [split_context_question(tok, sample.context, q, None, False) for q in questions]
        context = parts[0][0]
        engine = ModelRunner(model, tok, build_policy("kvzip"), parse_budget("10%"))
        first, sky, again = generate_agnostic(engine, context, [q for _, q in parts], SamplingParams(), 16)
    finally:
        torch.set_num_threads(before)
    assert sample.answers[0] in first.text, first.text
    assert again.token_ids == first.token_ids
    assert "blue" in sky.text.lower()
    cfg = model.config
    total = parse_budget("10%").total_entries(len(context), cfg.num_layers, cfg.num_kv_heads)
    assert sum(map(sum, first.lengths)) == total
    assert all(r.kv_bytes_held < 0.2 * r.kv_bytes_full for r in (first, sky, again))


def test_passes_are_the_prompt_the_turn_end_and_the_chunk_with_a_cue():
    ids = list(range(100, 140))
    plan = plan_passes(ids, [100, 101, 999], SUFFIX_IDS, FIRST_IDS, NEXT_IDS, chunk=16, cue=3)
    assert plan.prefix == 2  # the template prefix the context starts with is not reconstructed
    assert [(s, e) for _, s, e in plan.passes] == [(2, 18), (18, 34), (34, 40)]
    assert plan.passes[0][0] == FIRST_IDS + SUFFIX_IDS + ids[2:18]
    assert plan.passes[1][0] == NEXT_IDS + ids[15:18] + SUFFIX_IDS + ids[18:34]
    assert plan.passes[2][0] == NEXT_IDS + ids[31:34] + SUFFIX_IDS + ids[34:40]


# --------------------------------------------------------------------------------------------------------
# The fused CPU sweep (kernels/reconstruction.py) against the plain way: same attention, same kept entries
# --------------------------------------------------------------------------------------------------------

def _kept_sets(scores: torch.Tensor, k: int) -> set:
    """The (row, column) pairs of the k largest entries of a 2-D score tensor: a model-wide top-K."""
    idx = torch.topk(scores.flatten(), k).indices
    return {(int(i) // scores.shape[1], int(i) % scores.shape[1]) for i in idx}


@pytest.mark.parametrize("n,T,sinks,start,end,weighted,row_chunk,flash", [
    (300, 70, 4, 100, 164, False, 16, True),    # sinks + a middle chunk: context keys on both sides unscored
    (300, 70, 4, 100, 164, False, 16, False),   # the same without PyTorch's CPU flash op (the reference's lse)
    (300, 70, 0, 0, 64, True, 16, True),        # first chunk, no sinks, KVzip+ row weights
    (120, 130, 6, 6, 120, False, 32, True),     # one chunk covering the whole context: no unscored keys
    (257, 41, 4, 200, 257, True, 128, True),    # last chunk, a row chunk larger than the pass
])
def test_fused_reconstruction_attention_equals_the_plain_way(monkeypatch, n, T, sinks, start, end, weighted,
                                                             row_chunk, flash):
    from kvx.kernels import reconstruction as kr

    monkeypatch.setattr(kr, "ROW_CHUNK", row_chunk)
    if not flash:
        monkeypatch.setattr(kr, "_cpu_flash", lambda: None)
    g = torch.Generator().manual_seed(n + T + start)
    H, Hkv, d = 6, 2, 16
    q = torch.randn(H, T, d, generator=g) * 2
    k_ctx, v_ctx = torch.randn(Hkv, n, d, generator=g) * 2, torch.randn(Hkv, n, d, generator=g)
    k_own, v_own = torch.randn(Hkv, T, d, generator=g) * 2, torch.randn(Hkv, T, d, generator=g)
    w = torch.rand(T, generator=g) + 0.5 if weighted else None
    own_pos, ctx_pos = torch.arange(n, n + T), torch.arange(n)
    want_out, want_cm = kr.reconstruction_attention_plain(
        q, torch.cat([k_ctx, k_own], 1), torch.cat([v_ctx, v_own], 1), own_pos, torch.cat([ctx_pos, own_pos]),
        sinks, start, end, 0.3, w)
    out, cm = kr.reconstruction_attention(q, k_ctx, v_ctx, k_own, v_own, sinks, start, end, 0.3, w)
    assert cm.shape == (H, sinks + end - start) and out.shape == q.shape
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5)  # float rounding of a regrouped softmax
    torch.testing.assert_close(cm, want_cm, rtol=1e-5, atol=1e-8)
    for frac in (0.05, 0.1, 0.25, 0.5):  # the entries a top-K keeps are exactly the same
        k = max(1, int(frac * cm.numel()))
        assert _kept_sets(cm, k) == _kept_sets(want_cm, k)
    # and the plain way is what its name says: a dense softmax over the subset, max over the rows
    sub = kr.scored_keys(n, sinks, start, end, T, "cpu")
    keys = torch.cat([k_ctx, k_own], 1)[:, sub].repeat_interleave(H // Hkv, 0)
    logits = (q @ keys.transpose(-1, -2)) * 0.3
    logits[:, :, sinks + end - start:] = logits[:, :, sinks + end - start:].masked_fill(
        ~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    p = torch.softmax(logits, -1) * (w.view(1, -1, 1) if w is not None else 1)
    torch.testing.assert_close(want_cm, p.amax(1)[:, :sinks + end - start], rtol=1e-5, atol=1e-8)


def test_fused_reconstruction_attention_in_bfloat16():
    from kvx.kernels import reconstruction as kr

    g = torch.Generator().manual_seed(5)
    H, Hkv, d, n, T = 4, 2, 16, 90, 40
    q = torch.randn(H, T, d, generator=g).bfloat16()
    k_ctx, v_ctx = torch.randn(Hkv, n, d, generator=g).bfloat16(), torch.randn(Hkv, n, d, generator=g).bfloat16()
    k_own, v_own = torch.randn(Hkv, T, d, generator=g).bfloat16(), torch.randn(Hkv, T, d, generator=g).bfloat16()
    out, cm = kr.reconstruction_attention(q, k_ctx, v_ctx, k_own, v_own, 4, 30, 60, 0.25)
    want_out, want_cm = kr.reconstruction_attention_plain(
        q.float(), torch.cat([k_ctx, k_own], 1).float(), torch.cat([v_ctx, v_own], 1).float(),
        torch.arange(n, n + T), torch.arange(n + T), 4, 30, 60, 0.25)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(cm, want_cm, rtol=1e-5, atol=1e-8)  # the score is formed in float32 either way


def _kept_positions(req, cfg) -> list:
    return [[lc.head(g)[2].sort().values.tolist() for g in range(cfg.num_kv_heads)] for lc in req.cache.layers]


@pytest.mark.parametrize("spec", [{"chunk": "48"}, {"chunk": "48", "plus": "true"}, {"chunk": "200", "sinks": "0"}])
def test_kept_entries_equal_those_of_the_plain_passes_and_the_dense_reference(tiny, monkeypatch, spec):
    """The engine's passes (the fused CPU sweep, several row chunks per pass) keep exactly the (layer, kv
    head, position) entries that the plain passes (attention over the concatenated keys, then the column max
    over the subset: the code before the fused sweep) keep, and for plain KVzip those the dense reference's
    scores select, at several budgets."""
    from kvx.kernels import ops
    from kvx.kernels import reconstruction as kr

    monkeypatch.setattr(kr, "ROW_CHUNK", 16)
    ids = context_ids(200, seed=11)
    engine = ModelRunner(tiny, ReconstructionTokenizer())
    cfg = tiny.config
    fused = ops.reconstruction_attention

    def plain(q, k_ctx, v_ctx, ctx_pos, k_own, v_own, own_pos, sinks, start, end, scale, row_weight=None):
        return kr.reconstruction_attention_plain(q, torch.cat([k_ctx, k_own], 1), torch.cat([v_ctx, v_own], 1),
                                                 own_pos, torch.cat([ctx_pos, own_pos]), sinks, start, end, scale,
                                                 row_weight)

    want = None
    if spec.get("plus") != "true":
        want = dense_reference(tiny, ids, int(spec["chunk"]), 8, int(spec.get("sinks", 4)))
    for budget in ("5%", "10%", "25%", "50%"):
        kept = {}
        for name, impl in (("fused", fused), ("plain", plain)):
            monkeypatch.setattr(ops, "reconstruction_attention", impl)
            req = prefilled(engine, ids, build_policy("kvzip", args=spec), parse_budget(budget))
            if want is not None and name == "fused":
                torch.testing.assert_close(torch.stack([st.col_max for st in req.stats]), want, rtol=1e-4, atol=1e-6)
            engine.compress(req, headroom=0)
            kept[name] = _kept_positions(req, cfg)
        assert kept["fused"] == kept["plain"], budget
        if want is not None:
            req = prefilled(engine, ids, build_policy("kvzip", args=spec), parse_budget(budget))
            for st, ref in zip(req.stats, want):
                st.col_max = ref.clone()
            engine.compress(req, headroom=0)
            assert _kept_positions(req, cfg) == kept["fused"], budget

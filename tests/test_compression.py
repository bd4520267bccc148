"""What compression must deliver: bytes that follow the budget, per-head counts that really differ, a `full`
policy identical to the uncompressed runtime, decode-time eviction that holds its bound, retrieval from a
compressed cache (question-aware and question-agnostic).

Default-model tests (marked slow) share one 2k-token passkey prefill per seed: every policy is forked from
it (`ModelRunner.fork`), exactly as `kvx eval` does, so the comparison is on identical prompts and statistics.
Decode-time eviction runs on a tiny random checkpoint, where thousands of steps are cheap.
"""

from __future__ import annotations

import math

import pytest
import torch

from checkpoints import make_checkpoint
from kvx.eval import tasks
from kvx.kernels.stats import StatsRequest
from kvx.models.transformer import Transformer
from kvx.policies import build_policy, parse_budget
from kvx.policies.expected_attention import expected_logits, mean_rotation, rotation_matrix
from kvx.runtime.compression.decode_eviction import DECODE_SLACK
from kvx.runtime.engine.model_runner import ModelRunner
from kvx.runtime.engine.batch_engine import BatchEngine
from kvx.runtime.cache.paged_cache import PagedKVCache
from kvx.runtime.engine.sequence import GenerationRequest
from runtime_helpers import decode, new_request, pool_for
from test_engine import StubTokenizer

PASSKEY_SEEDS = (0, 1, 2)
PASSKEY_POLICIES = ("snapkv", "ada-snapkv", "ahakv", "laprox")
# SmolLM2's tokenizer writes a number one digit per token, so the needle is ~2x longer in tokens than on
# the 7B models the papers tuned their pooling kernels (5-7) on. A 15-wide pool keeps the whole number
# around the attended "pass key is"; for AhaKV (no attention pooling in the paper) it is the opt-in
# score_kernel option.
WIDE_POOL = {"snapkv": {"kernel": "15"}, "ada-snapkv": {"kernel": "15"}, "laprox": {"kernel": "15"},
             "ahakv": {"score_kernel": "15"}}
ANSWER_TOKENS = 14  # "The pass key is 51007." and a little more
HEADROOM = 8
BLOCK = 32  # the engine's block size


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The test machine is shared by several jobs on 2 cores: with 2 intra-op threads, every parallel op
    # waits for a descheduled worker (~10 ms each), which made a 2k decode step ~40x slower. One thread
    # changes the speed only; every comparison below is between runs under the same setting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------------
# Default model: shared prompts and prefills
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_model():
    from kvx.models import load_model
    from kvx.models.hub import pull_default_model

    return load_model(pull_default_model(quiet=True))


def passkey_prompt(tok, seed: int, context_tokens: int = 2000):
    """(ids, sample): chat template around context + question + "Answer with the number only.", no
    answer prefix — the format this model answers reliably with its full cache."""
    sample = tasks.generate("passkey", tok, context_tokens, seed=seed)
    user = sample.context + "\n\n" + sample.question + " Answer with the number only."
    text = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False), sample


def needle_span(tok, ids: list[int], key: str) -> torch.Tensor:
    """Token indices of the needle sentence ("The pass key is K. Remember it. K is the pass key.")."""
    pieces = [tok.decode([i]) for i in ids]
    starts = [0]
    for p in pieces:
        starts.append(starts[-1] + len(p))
    text = "".join(pieces)
    sentence = f"The pass key is {key}. Remember it. {key} is the pass key."
    at = text.index(sentence)
    first = max(j for j in range(len(ids)) if starts[j] <= at)
    last = min(j for j in range(len(ids)) if starts[j + 1] >= at + len(sentence))
    return torch.arange(first, last + 1)


class PasskeyRun:
    """One seed: the prompt prefilled once (statistics for all four policies), then every variant forked."""

    def __init__(self, engine: ModelRunner, tok, seed: int):
        self.engine = engine
        self.ids, self.sample = passkey_prompt(tok, seed)
        self.key = self.sample.answers[0]
        self.n = len(self.ids)
        self.budget = parse_budget("10%")
        self.policies = {name: build_policy(name) for name in PASSKEY_POLICIES}
        wanted = StatsRequest()
        for pol in self.policies.values():
            wanted = wanted.merge(pol.request_for(self.budget, self.n))
        # The base request runs AhaKV's attend path, so the recent queries it keeps for decoding are there.
        self.base = new_request(engine, capacity=self.n, policy=self.policies["ahakv"], budget=self.budget)
        self.logits = engine.prefill(self.base, self.ids, stats_req=wanted)
        self.needle = needle_span(tok, self.ids, self.key)

    def answer(self, policy=None, budget=None, keep=None) -> str:
        """Greedy answer from a fork compressed by the policy (or to exactly `keep`, or not at all)."""
        req = self.engine.fork(self.base, policy, budget)
        if keep is not None:
            req.cache = PagedKVCache.copy_of(req.cache, pool_for(self.engine), ANSWER_TOKENS, keep=keep)
        else:
            self.engine.compress(req, headroom=ANSWER_TOKENS, pool=pool_for(self.engine))
        _, text, _ = decode(self.engine, req, self.logits, ANSWER_TOKENS)
        return text

    def select(self, policy, budget):
        cfg = self.engine.config
        return policy.select(list(self.base.stats), budget, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim)


@pytest.fixture(scope="module")
def passkey(default_model):
    """Per seed: the run and the answers of the full cache, each policy at 10%, and an oracle cache."""
    model, tok = default_model
    engine = ModelRunner(model, tok)
    out = {}
    for seed in PASSKEY_SEEDS:
        run = PasskeyRun(engine, tok, seed)
        answers = {"full": run.answer()}
        for name, pol in run.policies.items():
            answers[name] = run.answer(pol, run.budget)
            answers[name + "+pool15"] = run.answer(build_policy(name, args=WIDE_POOL[name]), run.budget)
        # Oracle: SnapKV's per-head counts at 10%, but the needle sentence forced in (the oldest other
        # picks make room). Same entries, same bytes: only which tokens differ.
        oracle = []
        for layer in run.select(run.policies["snapkv"], run.budget):
            row = []
            for idx in layer:
                others = idx[~torch.isin(idx, run.needle)]
                room = idx.numel() - run.needle.numel()
                row.append(torch.sort(torch.cat([others[others.numel() - room:], run.needle])).values)
            oracle.append(row)
        answers["oracle"] = run.answer(keep=oracle)
        out[seed] = (run, answers)
    return out


def hits(passkey, name: str) -> int:
    return sum(run.key in answers[name] for run, answers in passkey.values())


def answers_of(passkey, name: str) -> dict[int, str]:
    return {seed: answers[name].strip() for seed, (run, answers) in passkey.items()}


# --------------------------------------------------------------------------------------------------------
# Bytes follow the budget
# --------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["snapkv", "ada-snapkv", "laprox"])  # uniform, ada, global allocation
def test_bytes_held_follow_the_budget(passkey, name):
    run, _ = passkey[PASSKEY_SEEDS[0]]
    engine, cfg = run.engine, run.engine.config
    L, hkv, entry = cfg.num_layers, cfg.num_kv_heads, engine.entry_bytes()
    assert entry == 2 * cfg.head_dim * 4  # float32 K and V
    full_bytes = L * hkv * run.n * entry
    headroom_bytes = HEADROOM * L * hkv * entry  # headroom tokens x layers x kv heads x entry bytes
    policy = build_policy(name)
    held = {}
    for text, share in (("5%", 0.05), ("10%", 0.10), ("20%", 0.20)):
        budget = parse_budget(text)
        req = engine.fork(run.base, policy, budget)
        pool = pool_for(engine, block_size=BLOCK)
        engine.compress(req, headroom=HEADROOM, pool=pool)
        kept = req.cache.total_entries()
        assert kept == budget.total_entries(run.n, L, hkv)
        assert abs(kept - share * L * hkv * run.n) <= 1
        # The cache really holds only the blocks for the kept entries plus the headroom, nothing masked: each
        # (layer, kv head) segment exactly ceil((kept + headroom) / block) blocks, and the pool lends no more.
        blocks = sum(-(-(n + HEADROOM) // BLOCK) for layer in req.cache.lengths() for n in layer)
        assert pool.num_used == req.cache.blocks_held() == blocks
        assert req.cache.bytes_allocated() == blocks * pool.block_bytes
        assert req.cache.bytes_allocated() - (kept * entry + headroom_bytes) < L * hkv * pool.block_bytes
        assert abs(req.cache.bytes_used() / full_bytes - share) <= 0.02 * share
        held[text] = req.cache.bytes_used()
        if text == "5%":
            # Generating within the headroom never grows the cache; the result reports those bytes.
            ids, text_out, finish = decode(engine, req, run.logits, HEADROOM, stop_at_eos=False)
            assert len(ids) == HEADROOM and pool.num_used == 0  # released when the answer ended
            batch = BatchEngine(engine, pool=pool_for(engine, block_size=BLOCK))
            again = engine.fork(run.base, policy, budget)
            engine.compress(again, headroom=HEADROOM, pool=batch.pool)
            seq = batch.adopt(again, GenerationRequest(prompt_ids=run.ids, max_tokens=HEADROOM, stop_at_eos=False),
                              run.logits)
            batch.run()
            result = seq.results[0]
            assert result.kv_bytes_held == blocks * pool.block_bytes
            assert result.kv_bytes_full == L * hkv * (run.n + HEADROOM - 1) * entry
            assert result.kv_bytes_held < 0.06 * result.kv_bytes_full + L * hkv * pool.block_bytes
    assert held["20%"] / held["10%"] == pytest.approx(2.0, rel=0.01)
    assert held["10%"] / held["5%"] == pytest.approx(2.0, rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ada-snapkv", "laprox"])
def test_per_head_counts_differ_and_the_cache_holds_exactly_them(passkey, name):
    run, _ = passkey[PASSKEY_SEEDS[0]]
    engine, cfg = run.engine, run.engine.config
    policy, budget = build_policy(name), parse_budget("5%")
    keep = run.select(policy, budget)  # deterministic: the same choice compress() makes
    req = engine.fork(run.base, policy, budget)
    engine.compress(req, headroom=HEADROOM, pool=pool_for(engine))
    counts = [[int(idx.numel()) for idx in layer] for layer in keep]
    assert req.lengths_after_compress == counts == req.cache.lengths()
    heads_differ = [len(set(layer)) > 1 for layer in counts]
    layer_totals = [sum(layer) for layer in counts]
    if name == "ada-snapkv":
        # Head-wise budgets inside equal layer budgets (up to the remainder of an uneven split).
        assert sum(heads_differ) >= cfg.num_layers // 2
        assert max(layer_totals) - min(layer_totals) <= cfg.num_kv_heads
    else:
        # One top-K over the whole model: layer totals are free too, and heads end up far apart.
        assert sum(heads_differ) >= cfg.num_layers // 2
        assert max(layer_totals) - min(layer_totals) > 10 * cfg.num_kv_heads
        flat = [c for layer in counts for c in layer]
        assert max(flat) >= 3 * min(flat)
    base_k = run.base.cache.layers
    for layer, (lc, idx_row) in enumerate(zip(req.cache.layers, keep)):
        B = lc.pool.block_size  # exactly the blocks for kept + headroom entries
        assert lc.capacities == [-(-(c + HEADROOM) // B) * B for c in counts[layer]]
        for g, idx in enumerate(idx_row):
            k, v, pos = lc.head(g)
            src_k, src_v, src_pos = base_k[layer].head(g)
            assert torch.equal(pos, src_pos[idx])
            assert torch.equal(k, src_k[idx]) and torch.equal(v, src_v[idx])


# --------------------------------------------------------------------------------------------------------
# `full` is the uncompressed runtime
# --------------------------------------------------------------------------------------------------------

def generate_recording_logits(engine: ModelRunner, ids: list[int], max_tokens: int):
    """Generate through the engine, recording every decode step's logits (instrumenting this test's own
    stepper instance)."""
    batch = BatchEngine(engine, kv_memory=256 << 20)
    seen = []
    step = batch.stepper.step

    def recording(reqs, tokens):
        logits = step(reqs, tokens)
        seen.append(logits[0].clone())
        return logits

    batch.stepper.step = recording
    seq = batch.submit(GenerationRequest(prompt_ids=ids, max_tokens=max_tokens, policy=engine.policy,
                                         budget=engine.budget))
    batch.run()
    return seq.results[0], torch.stack(seen)


@pytest.mark.slow
def test_full_policy_is_bit_identical_to_the_uncompressed_runtime(default_model):
    model, tok = default_model
    ids, _ = passkey_prompt(tok, seed=5, context_tokens=300)
    plain, plain_logits = generate_recording_logits(ModelRunner(model, tok), ids, 20)
    full, full_logits = generate_recording_logits(
        ModelRunner(model, tok, build_policy("full"), parse_budget("10%")), ids, 20)
    assert full.token_ids == plain.token_ids and len(full.token_ids) > 3
    assert torch.equal(full_logits, plain_logits)
    assert full.kv_bytes_held == plain.kv_bytes_held
    assert full.kv_entries_kept == full.kv_entries_full == plain.kv_entries_kept


# --------------------------------------------------------------------------------------------------------
# Question-aware needle retrieval at 10%
# --------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_cache_finds_the_passkey_every_time(passkey):
    assert hits(passkey, "full") == len(PASSKEY_SEEDS), answers_of(passkey, "full")


@pytest.mark.slow
def test_a_10_percent_cache_that_holds_the_needle_answers(passkey):
    # Same per-head counts and bytes as SnapKV at 10%, with the needle sentence among the kept tokens:
    # the compressed runtime (ragged pools, positions, RoPE'd keys, decode over the segments) retrieves.
    assert hits(passkey, "oracle") == len(PASSKEY_SEEDS), answers_of(passkey, "oracle")


@pytest.mark.slow
@pytest.mark.parametrize("name", PASSKEY_POLICIES)
def test_policy_keeps_where_the_needle_is(passkey, name):
    # Every policy keeps the needle's start ("... pass key is 5"): its answer begins with the right digit.
    first_digit = sum(
        answers[name].strip().startswith(f"The pass key is {run.key[0]}") for run, answers in passkey.values())
    assert first_digit >= 2, answers_of(passkey, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", PASSKEY_POLICIES)
@pytest.mark.xfail(strict=True, reason=(
    "SmolLM2-135M at 2k context and 10%: the question window attends to ' pass key is', not to the digits, "
    "so the selections keep the key's first digits and lose the rest (measured hits over seeds 0-2: "
    "snapkv 1, ada-snapkv 1, ahakv 0, laprox 0; full 3, oracle 3). Strict: remove this mark when it passes."))
def test_policy_finds_the_passkey_at_10_percent(passkey, name):
    assert hits(passkey, name) >= 2, answers_of(passkey, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", PASSKEY_POLICIES)
def test_policy_finds_the_passkey_at_10_percent_with_a_wide_pool(passkey, name):
    # The paper defaults above miss the key's later digits on this model; with a pooling kernel that spans
    # a digit-per-token number, every policy retrieves it at 10% (measured: 3/3 for all four).
    assert hits(passkey, name + "+pool15") >= 2, answers_of(passkey, name + "+pool15")


# --------------------------------------------------------------------------------------------------------
# Question-agnostic: one compressed context, several questions
# --------------------------------------------------------------------------------------------------------

class EvictionCounter(BatchEngine):
    evictions = 0

    def _decode_evict(self, reqs):
        before = [r.cache.total_entries() for r in reqs]
        super()._decode_evict(reqs)
        self.evictions += sum(r.cache.total_entries() < b for r, b in zip(reqs, before))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["knorm", "h2o"])
def test_agnostic_answers_every_question_from_one_compressed_cache(default_model, name):
    from kvx.options import split_context_question

    model, tok = default_model
    sample = tasks.generate("passkey", tok, 1000, seed=0)
    questions = ["What is the pass key? Answer with the number only.", "What color is the sky? Answer in one word.",
                 "What is the pass key? Answer with the number only."]
    parts = [split_context_question(tok, sample.context, q, None, False) for q in questions]
    context = parts[0][0]
    assert all(c == context for c, _ in parts)
    batch = EvictionCounter(ModelRunner(model, tok), kv_memory=256 << 20)
    seq = batch.submit(GenerationRequest(context_ids=context, question_ids=[q for _, q in parts], max_tokens=16,
                                         policy=build_policy(name), budget=parse_budget("20%")))
    batch.run()
    results = seq.results
    engine = batch
    first, sky, again = results
    # The cache is restored between questions: the same question gets the same answer from the same state.
    assert again.token_ids == first.token_ids
    assert again.prompt_tokens == first.prompt_tokens == len(context) + len(parts[0][1])
    assert again.kv_bytes_held == first.kv_bytes_held
    assert all(r.kv_bytes_held < 0.25 * r.kv_bytes_full for r in results)
    assert "blue" in sky.text.lower()
    if name == "knorm":
        assert sample.answers[0] in first.text, first.text
    else:
        # H2O evicts while it answers (question + answer overflow the slack), and the restore undoes it.
        assert engine.evictions > 0


# --------------------------------------------------------------------------------------------------------
# Decode-time eviction keeps its bound (tiny checkpoint, thousands of steps)
# --------------------------------------------------------------------------------------------------------

# Most recent tokens each policy must always hold at a 256-token budget.
RECENT_KEPT = {"streaming": 256 - 4, "h2o": 128, "tova": 1, "ahakv": 32}


class WatchedBatch(BatchEngine):
    """Checks the cache around every decode-time eviction round."""

    def __init__(self, *args, recent: int, sinks: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.recent, self.sinks = recent, sinks
        self.calls = self.evictions = 0
        self.most_held = 0

    def _check(self, req, slack: int) -> None:
        newest = req.position - 1
        B = self.pool.block_size
        for lc, targets in zip(req.cache.layers, req.head_budget):
            for g, target in enumerate(targets):
                n = lc.lengths[g]
                # never more than budget + slack entries, nor blocks beyond what those need
                assert n <= target + slack and len(lc.tables[g]) <= -(-(target + DECODE_SLACK) // B)
                self.most_held = max(self.most_held, n - target)
                pos = lc.head(g)[2]
                assert bool((pos[1:] > pos[:-1]).all()), "positions out of order"
                assert int(pos[-1]) == newest
                recent = min(self.recent, n - self.sinks)
                assert torch.equal(pos[n - recent:], torch.arange(newest - recent + 1, newest + 1))
                assert torch.equal(pos[:self.sinks], torch.arange(self.sinks))

    def _decode_evict(self, reqs) -> None:
        for req in reqs:
            self.calls += 1
            self._check(req, DECODE_SLACK)
        before = [r.cache.total_entries() for r in reqs]
        super()._decode_evict(reqs)
        for req, b in zip(reqs, before):
            self._check(req, DECODE_SLACK - 1)
            self.evictions += req.cache.total_entries() < b


@pytest.fixture(scope="module")
def tiny_long_model(tmp_path_factory):
    path, _ = make_checkpoint("qwen2", tmp_path_factory.mktemp("ckpt"), max_position_embeddings=8192)
    return Transformer.from_pretrained(path)


@pytest.mark.parametrize("name", ["h2o", "tova", "streaming", "ahakv"])
def test_decode_time_eviction_holds_budget_plus_slack(tiny_long_model, name):
    model = tiny_long_model
    cfg = model.config
    ids = torch.randint(3, 128, (600,), generator=torch.Generator().manual_seed(1)).tolist()
    engine = ModelRunner(model, StubTokenizer())
    batch = WatchedBatch(engine, kv_memory=64 << 20, recent=RECENT_KEPT[name], sinks=4 if name == "streaming" else 0)
    seq = batch.submit(GenerationRequest(prompt_ids=ids, max_tokens=4000, policy=build_policy(name),
                                         budget=parse_budget("256")))
    batch.run()
    result = seq.results[0]  # the stub tokenizer has no EOS
    assert result.generated_tokens == 4000 and result.finish_reason == "length"
    assert batch.calls == 3999  # after every decode step but the last
    assert batch.evictions >= 3999 // DECODE_SLACK
    assert batch.most_held == DECODE_SLACK  # the bound is reached, never passed
    assert result.lengths == [[256] * cfg.num_kv_heads] * cfg.num_layers
    blocks = cfg.num_layers * cfg.num_kv_heads * -(-(256 + DECODE_SLACK) // batch.pool.block_size)
    assert result.kv_bytes_held == blocks * batch.pool.block_bytes
    assert result.kv_entries_kept <= cfg.num_layers * cfg.num_kv_heads * (256 + DECODE_SLACK)
    assert batch.pool.num_used == 0 and batch.pool.reserved == 0


# --------------------------------------------------------------------------------------------------------
# ExpectedAttention's batched logits
# --------------------------------------------------------------------------------------------------------

def test_expected_logits_batched_and_tiled_match_per_head_formula(monkeypatch):
    import kvx.policies.expected_attention as ea

    gen = torch.Generator().manual_seed(3)
    H, hkv, n, d = 6, 2, 50, 16
    keys = torch.randn(hkv, n, d, generator=gen)
    mean = torch.randn(H, d, generator=gen)
    a = torch.randn(H, d, d, generator=gen)
    cov = a @ a.transpose(1, 2) / d
    inv_freq = 1.0 / (500.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cos, sin = mean_rotation(inv_freq, 40, 7)
    rt = rotation_matrix(cos, sin).double()
    want = torch.stack([
        keys[h // 3].double() @ (rt.T @ mean[h].double()) / math.sqrt(d)
        + torch.einsum("nd,de,ne->n", keys[h // 3].double(), rt.T @ cov[h].double() @ rt, keys[h // 3].double())
        / (2 * d) for h in range(H)])
    got = expected_logits(keys, mean, cov, cos, sin)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(ea, "LOGIT_TILE_ELEMENTS", H * (d + 1) * 7)  # 7 keys per tile, last tile partial
    torch.testing.assert_close(expected_logits(keys, mean, cov, cos, sin), got, rtol=1e-5, atol=1e-5)
    no_cov = expected_logits(keys, mean, None, cos, sin)
    want_lin = torch.stack([keys[h // 3].double() @ (rt.T @ mean[h].double()) / math.sqrt(d) for h in range(H)])
    torch.testing.assert_close(no_cov.double(), want_lin, rtol=1e-4, atol=1e-4)


def test_expected_attention_rotation_is_reused_within_a_request_only():
    scorer = build_policy("expected-attention").scorer
    first = scorer.averaged_rotation(16, 100, "cpu")
    assert scorer.averaged_rotation(16, 100, "cpu") is first  # every layer of one request
    later = scorer.averaged_rotation(16, 101, "cpu")
    assert later is not first
    cos, sin = mean_rotation(scorer.inv_freq(16), 101, scorer.horizon)
    torch.testing.assert_close(later[2], rotation_matrix(cos, sin))

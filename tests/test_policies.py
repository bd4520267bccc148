"""Eviction policies on hand-built statistics: scorers against their formulas, constructed cases with known
answers, allocators' exact totals and shapes, budget parsing, the registry.

Statistics are computed here from explicit random q, k, v with a full [H, n, n] attention matrix (n is tiny),
independently of kvx.kernels.stats.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from kvx.errors import KvxError
from kvx.kernels.stats import LayerStats
from kvx.models.rope import apply_rope, default_inv_freq
from kvx.policies import (
    ALLOCATOR_NAMES,
    POLICY_NAMES,
    SCORER_NAMES,
    Budget,
    DecodeView,
    build_policy,
    describe_policies,
    parse_budget,
)
from kvx.policies.adakv import AdaAllocator
from kvx.policies.ahakv import sg_column_sums, sg_scale
from kvx.policies.allocation import LayerCandidates, UniformAllocator, round_to_total, spread_evenly
from kvx.policies.base import ScoreContext
from kvx.policies.global_topk import GlobalAllocator
from kvx.policies.pyramidkv import PyramidAllocator, pyramid_schedule

torch.set_num_threads(2)


# --------------------------------------------------------------------------------------------------------
# Plain statistics from explicit attention
# --------------------------------------------------------------------------------------------------------

def attention_probs(q: torch.Tensor, k: torch.Tensor, scale) -> torch.Tensor:
    """[H, n, n] causal softmax of q·k·scale (scale a number or a per-row [n] tensor)."""
    H, n, d = q.shape
    G = H // k.shape[0]
    logits = torch.einsum("htd,hsd->hts", q.double(), k.double().repeat_interleave(G, 0))
    scale = torch.as_tensor(scale, dtype=torch.float64)
    logits = logits * (scale.view(1, -1, 1) if scale.dim() else scale)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


def make_stats(H=4, Hkv=2, n=64, d=16, window=8, sg_rows=8, sg_budget=8, seed=0, q=None, k=None, v=None,
               wo=None) -> tuple[LayerStats, dict]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(H, n, d, generator=gen) if q is None else q
    k = torch.randn(Hkv, n, d, generator=gen) if k is None else k
    v = torch.randn(Hkv, n, d, generator=gen) if v is None else v
    D = H * d
    wo = torch.randn(D, H * d, generator=gen) / math.sqrt(D) if wo is None else wo
    G = H // Hkv
    A = attention_probs(q, k, 1 / math.sqrt(d))
    lam = torch.sqrt(2 * torch.log((torch.arange(n) + 1.0) / sg_budget).clamp(min=0) / d).clamp(min=1 / math.sqrt(d))
    A_sg = attention_probs(q, k, lam)
    u = torch.stack([v[h // G].double() @ wo[:, h * d:(h + 1) * d].T.double() for h in range(H)])  # [H, n, D]
    qd = q.double()[:, 4:]  # ExpectedAttention's query moments leave the 4 sinks out
    mean = qd.mean(1)
    cov = torch.einsum("hti,htj->hij", qd - mean[:, None], qd - mean[:, None]) / (n - 4)
    st = LayerStats(
        n=n, positions=torch.arange(n), window=window, query_position=n - 1,
        col_sum=A[:, n - window:].sum(1).float(), col_sq=(A[:, n - window:] ** 2).sum(1).float(),
        last_row=A[:, -1].float(), colsum_all=A.sum(1).float(),
        colsum_count=torch.arange(n, 0, -1), col_sum_sg=A_sg[:, n - sg_rows:].sum(1).float(),
        key_norm=k.norm(dim=-1), value_norm=v.norm(dim=-1),
        value_out_norm=u.norm(dim=-1).float(), value_out_l1=u.abs().sum(-1).float(),
        q_mean=mean.float(), q_cov=cov.float())
    st.keys = k  # post-RoPE keys, for ExpectedAttention
    return st, dict(q=q, k=k, v=v, A=A, wo=wo)


def ctx_for(st: LayerStats, H, Hkv, d, sinks=0, window=0) -> ScoreContext:
    return ScoreContext(layer=0, num_layers=1, num_kv_heads=Hkv, num_heads=H, head_dim=d, lo=sinks,
                        hi=st.n - window, per_head=8.0)


def ref_pool(x: torch.Tensor, kernel: int, kind: str, count_pad: bool = True) -> torch.Tensor:
    """Loop pooling with zero padding (avg counts the padding unless count_pad is False), output length =
    input length."""
    m = x.shape[-1]
    out = torch.empty_like(x)
    p = kernel // 2
    for j in range(m):
        lo, hi = j - p, j - p + kernel
        seg = x[..., max(lo, 0):min(hi, m)]
        if kind == "max":
            out[..., j] = seg.max(-1).values
        else:
            out[..., j] = seg.sum(-1) / (kernel if count_pad else seg.shape[-1])
    return out


def group_mean(x, Hkv):
    return x.reshape(Hkv, -1, x.shape[-1]).mean(1)


# --------------------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------------------

def test_parse_budget_forms():
    assert parse_budget("5%") == Budget(fraction=0.05, tokens=None)
    assert parse_budget(" 512 ") == Budget(fraction=None, tokens=512)
    assert parse_budget("100%").keeps_everything(10)
    assert parse_budget("0.5%").fraction == pytest.approx(0.005)
    assert str(parse_budget("5%")) == "5%" and str(parse_budget("512")) == "512"


@pytest.mark.parametrize("text", ["0", "0%", "-5", "-5%", "150%", "100.5%", "abc", "", "   ", "1.5", "5%%", "%"])
def test_parse_budget_errors(text):
    with pytest.raises(KvxError) as info:
        parse_budget(text)
    assert "\n" not in str(info.value) and str(info.value)


def test_budget_arithmetic():
    b = parse_budget("5%")
    assert b.total_entries(1000, 4, 2) == 400
    assert b.per_head(1000) == 50
    assert not b.keeps_everything(1000)
    # At least one entry per head, never more than exist.
    assert b.total_entries(3, 4, 2) == 8
    t = parse_budget("512")
    assert t.total_entries(10_000, 4, 2) == 512 * 8
    assert t.total_entries(100, 4, 2) == 800 and t.keeps_everything(512) and not t.keeps_everything(513)
    assert t.per_head(100) == 100 and t.per_head(1000) == 512


# --------------------------------------------------------------------------------------------------------
# Scorers against their formulas
# --------------------------------------------------------------------------------------------------------

H, HKV, N, D, W = 4, 2, 64, 16, 8


@pytest.fixture(scope="module")
def stats_and_raw():
    return make_stats(H, HKV, N, D, window=W, sg_rows=W, sg_budget=8, seed=1)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_snapkv_score_matches_formula(stats_and_raw, pooling):
    st, raw = stats_and_raw
    pol = build_policy("snapkv", args={"window": str(W), "pooling": pooling})
    got = pol.scorer.score(st, ctx_for(st, H, HKV, D, window=W))[:, :N - W]
    mean = raw["A"][:, N - W:, :N - W].mean(1)  # window rows' mean attention on the candidates
    want = group_mean(ref_pool(mean, 7, pooling), HKV)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_h2o_score_matches_formula(stats_and_raw):
    st, raw = stats_and_raw
    A = raw["A"]
    got = build_policy("h2o").scorer.score(st, ctx_for(st, H, HKV, D))
    torch.testing.assert_close(got.double(), group_mean(A.sum(1), HKV), rtol=1e-5, atol=1e-6)
    got_n = build_policy("h2o", args={"normalize": "true"}).scorer.score(st, ctx_for(st, H, HKV, D))
    count = torch.arange(N, 0, -1).double()
    torch.testing.assert_close(got_n.double(), group_mean(A.sum(1) / count, HKV), rtol=1e-5, atol=1e-7)


def test_tova_knorm_scores(stats_and_raw):
    st, raw = stats_and_raw
    got = build_policy("tova").scorer.score(st, ctx_for(st, H, HKV, D, window=1))
    torch.testing.assert_close(got.double(), group_mean(raw["A"][:, -1], HKV), rtol=1e-5, atol=1e-7)
    # The paper's variant: the mean over every head of the layer, the same ranking for every kv head.
    layer = build_policy("tova", args={"heads": "layer"})._plan(st, 0, 1, HKV, H, D, per_head=3.0).scores
    want = raw["A"][:, -1].mean(0).expand(HKV, -1)
    torch.testing.assert_close(layer.double(), want, rtol=1e-5, atol=1e-7)
    keep = build_policy("tova", args={"heads": "layer"}).select([st], parse_budget("3"), HKV, H, D)[0]
    assert all(torch.equal(keep[0], idx) for idx in keep)
    with pytest.raises(KvxError, match="group, layer"):
        build_policy("tova", args={"heads": "all"})
    assert "heads=layer" in build_policy("tova", args={"heads": "layer"}).describe()


@pytest.mark.parametrize("name", ["snapkv", "criticalkv", "laprox", "ada-snapkv", "knorm"])
def test_heads_layer_keeps_one_token_set_per_layer(stats_and_raw, name):
    """heads=layer: every kv head ranks by the layer's mean score, so (with equal counts) keeps the same set."""
    st, raw = stats_and_raw
    policy = build_policy(name, args={"heads": "layer"})
    assert policy.selection.heads == "layer" and build_policy(name).selection.heads == "group"
    per_head = build_policy(name)._plan(st, 0, 1, HKV, H, D, per_head=10.0).scores
    plan = policy._plan(st, 0, 1, HKV, H, D, per_head=10.0)
    torch.testing.assert_close(plan.scores, per_head.mean(0, keepdim=True).expand_as(per_head))
    if plan.second is not None:
        assert all(torch.equal(plan.second[0], row) for row in plan.second)
    keep = policy.select([st], parse_budget("12"), HKV, H, D)[0]
    if name not in ("laprox", "ada-snapkv"):  # these may give heads different counts
        assert all(torch.equal(keep[0], idx) for idx in keep)
    assert [len(i) for i in keep] != [] and sum(len(i) for i in keep) == 12 * HKV
    got = build_policy("knorm").scorer.score(st, ctx_for(st, H, HKV, D))
    torch.testing.assert_close(got, -raw["k"].norm(dim=-1))


def projected(raw, p):
    G = H // HKV
    return torch.stack([torch.linalg.vector_norm(raw["v"][h // G].double() @ raw["wo"][:, h * D:(h + 1) * D].T.double(),
                                                 ord=p, dim=-1) for h in range(H)])


def test_laprox_score_matches_formula(stats_and_raw):
    st, raw = stats_and_raw
    pol = build_policy("laprox", args={"window": str(W)})
    got = pol.scorer.score(st, ctx_for(st, H, HKV, D, window=W))[:, :N - W]
    A_w = raw["A"][:, N - W:, :N - W]
    per_head = A_w.norm(dim=1) * projected(raw, 2)[:, :N - W]  # ||A[W, j]||_2 ||v_j W_O^h||_2
    want = ref_pool(group_mean(per_head, HKV), 7, "avg")
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)


def test_criticalkv_stage_two_matches_formula(stats_and_raw):
    st, raw = stats_and_raw
    pol = build_policy("criticalkv", args={"window": str(W), "eps": "0.001"})
    ctx = ctx_for(st, H, HKV, D, window=W)
    base = pol.scorer.score(st, ctx)
    second = pol.scorer.stage_two(st, ctx, base)
    want = (base.double() + 1e-3) * group_mean(projected(raw, 1), HKV)
    torch.testing.assert_close(second.double(), want, rtol=1e-4, atol=1e-7)
    assert pol.scorer.first_stage_ratio == 0.5


@pytest.mark.parametrize("prior_pad", ["exclude", "include"])
def test_ahakv_score_matches_formula(stats_and_raw, prior_pad):
    st, raw = stats_and_raw
    args = {"recent": str(W)} if prior_pad == "exclude" else {"recent": str(W), "prior_pad": prior_pad}
    pol = build_policy("ahakv", args=args)
    got = pol.scorer.score(st, ctx_for(st, H, HKV, D, window=W))[:, :N - W]
    q, k, v = raw["q"], raw["k"], raw["v"]
    # Step-gain softmax of the last W rows, from the raw logits (no 1/sqrt(d)).
    G = H // HKV
    recent = torch.zeros(H, N, dtype=torch.float64)
    for h in range(H):
        for i in range(N - W, N):
            lam = max(math.sqrt(2 * math.log((i + 1) / 8) / D), 1 / math.sqrt(D))
            x = q[h, i].double() @ k[h // G, :i + 1].double().T
            recent[h, :i + 1] += torch.softmax(lam * x, dim=0)
    nu = v.double().norm(dim=-1)[:, :N - W] ** 2
    # By default the value prior's avg-pool averages only real candidates (no zero padding counted).
    gamma = ref_pool(nu, 7, "avg", count_pad=prior_pad == "include")
    want = group_mean(recent, HKV)[:, :N - W] * gamma / gamma.max(-1, keepdim=True).values
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)


def test_ahakv_score_kernel_max_pools_the_attention_score(stats_and_raw):
    # score_kernel (off by default, as in the paper) max-pools the accumulated score over the candidates
    # before the value prior multiplies it.
    st, _ = stats_and_raw
    ctx = ctx_for(st, H, HKV, D, window=W)
    plain = build_policy("ahakv", args={"recent": str(W), "kernel": "1"}).scorer.score(st, ctx)[:, :N - W]
    pooled = build_policy("ahakv", args={"recent": str(W), "kernel": "1", "score_kernel": "5"}).scorer.score(st, ctx)
    nu = st.value_norm.double()[:, :N - W] ** 2
    prior = nu / nu.max(-1, keepdim=True).values
    recent = plain.double() / prior
    torch.testing.assert_close(pooled[:, :N - W].double(), ref_pool(recent, 5, "max") * prior, rtol=1e-4, atol=1e-7)


def test_expected_attention_matches_formula(stats_and_raw):
    st, raw = stats_and_raw
    horizon = 16
    pol = build_policy("expected-attention", args={"horizon": str(horizon), "eps": "0.01"})
    inv_freq = default_inv_freq(D, 500.0)
    pol.set_model_info(inv_freq=inv_freq, num_heads=H, head_dim=D, rope_theta=500.0)
    got = pol.scorer.score(st, ctx_for(st, H, HKV, D, sinks=4))
    # The averaged rotation, built from the model's own RoPE: R̄ = mean_t R_t over the next positions.
    future = torch.arange(N, N + horizon)
    eye = torch.eye(D).expand(horizon, D, D).transpose(0, 1)  # [D (rows as vectors), T, D]
    R_bar = apply_rope(eye.double(), future, inv_freq).mean(1).T  # columns R̄ e_i
    mu, cov, k = st.q_mean.double(), st.q_cov.double(), raw["k"].double()
    G = H // HKV
    z = torch.stack([k[h // G] @ (R_bar @ mu[h]) / math.sqrt(D)
                     + torch.einsum("nd,de,ne->n", k[h // G], R_bar @ cov[h] @ R_bar.T, k[h // G]) / (2 * D)
                     for h in range(H)])
    want = (group_mean(torch.softmax(z, -1), HKV) + 0.01) * raw["v"].double().norm(dim=-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    # Without covariance or ||v||: the plain expected softmax.
    pol2 = build_policy("expected-attention", args={"horizon": str(horizon), "covariance": "false", "vnorm": "no"})
    pol2.set_model_info(inv_freq=inv_freq)
    z2 = torch.stack([k[h // G] @ (R_bar @ mu[h]) / math.sqrt(D) for h in range(H)])
    torch.testing.assert_close(pol2.scorer.score(st, ctx_for(st, H, HKV, D, sinks=4)).double(),
                               group_mean(torch.softmax(z2, -1), HKV), rtol=1e-4, atol=1e-7)


def test_expected_attention_theta_fallback_and_override():
    pol = build_policy("expected-attention", args={"rope_theta": "1234"})
    pol.set_model_info(inv_freq=default_inv_freq(8, 10000.0), rope_theta=10000.0)
    torch.testing.assert_close(pol.scorer.inv_freq(8), default_inv_freq(8, 1234.0))
    plain = build_policy("expected-attention")
    torch.testing.assert_close(plain.scorer.inv_freq(8), default_inv_freq(8, 10000.0))
    plain.set_model_info(rope_theta=500000.0)
    torch.testing.assert_close(plain.scorer.inv_freq(8), default_inv_freq(8, 500000.0))


# --------------------------------------------------------------------------------------------------------
# Constructed cases with known answers
# --------------------------------------------------------------------------------------------------------

def all_kept(keep):
    return [[idx.tolist() for idx in layer] for layer in keep]


def test_snapkv_keeps_the_key_every_window_query_attends_to():
    n, d, window = 80, 16, 8
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(H, n, d, generator=gen)
    k = torch.randn(HKV, n, d, generator=gen) * 0.3
    direction = torch.randn(d, generator=gen)
    direction /= direction.norm()
    q[:, n - window:] += 4 * direction  # every window query of every head looks the same way ...
    k[:, 20] = 6 * direction  # ... and key 20 is exactly there
    st, _ = make_stats(H, HKV, n, d, window=window, q=q, k=k)
    exact = build_policy("snapkv", args={"window": str(window), "kernel": "1"})
    for idx in exact.select([st], parse_budget(str(window + 1)), HKV, H, d)[0]:
        assert idx.tolist() == [20] + list(range(n - window, n))
    # Max-pool 7 spreads the peak over its neighbourhood: a budget of 7 more keeps exactly 17..23.
    pooled = build_policy("snapkv", args={"window": str(window)})
    for idx in pooled.select([st], parse_budget(str(window + 7)), HKV, H, d)[0]:
        assert idx.tolist() == list(range(17, 24)) + list(range(n - window, n))


def test_streaming_keeps_sinks_and_most_recent(stats_and_raw):
    st, _ = stats_and_raw
    keep = build_policy("streaming").select([st, st], parse_budget("20"), HKV, H, D)
    for layer in keep:
        for idx in layer:
            assert idx.tolist() == [0, 1, 2, 3] + list(range(N - 16, N))


def test_knorm_keeps_lowest_norms(stats_and_raw):
    st, raw = stats_and_raw
    keep = build_policy("knorm").select([st], parse_budget("10"), HKV, H, D)
    for g, idx in enumerate(keep[0]):
        want = torch.sort(torch.argsort(raw["k"][g].norm(dim=-1))[:10]).values
        assert idx.tolist() == want.tolist()


def test_laprox_prefers_large_projected_value():
    n = 60
    st = LayerStats(n=n, positions=torch.arange(n), window=8, query_position=n - 1,
                    col_sum=torch.full((H, n), 0.1), col_sq=torch.full((H, n), 0.01),
                    value_out_norm=torch.ones(H, n))
    st.value_out_norm[:, 12] = 20.0  # same attention as token 40 ...
    st.value_out_norm[:, 40] = 0.05  # ... but its value moves the layer output far more
    keep = build_policy("laprox", args={"window": "8", "kernel": "1"}).select([st], parse_budget("9"), HKV, H, D)
    for idx in keep[0]:
        assert idx.tolist() == [12] + list(range(n - 8, n))
    # Avg-pool 7 spreads token 12's weight over 9..15; token 40's neighbourhood still loses.
    keep = build_policy("laprox", args={"window": "8"}).select([st], parse_budget("15"), HKV, H, D)
    for idx in keep[0]:
        assert idx.tolist() == list(range(9, 16)) + list(range(n - 8, n))


def test_tova_keeps_last_row_argmax(stats_and_raw):
    st, raw = stats_and_raw
    # The paper's rule by default: the mean over every head of the layer, one token for every kv head.
    assert build_policy("tova").selection.heads == "layer"
    keep = build_policy("tova").select([st], parse_budget("2"), HKV, H, D)
    best = int(raw["A"][:, -1, :N - 1].mean(0).argmax())
    for idx in keep[0]:
        assert idx.tolist() == sorted([best, N - 1])
    # kvx's per-group variant stays an option.
    keep = build_policy("tova", args={"heads": "group"}).select([st], parse_budget("2"), HKV, H, D)
    best = group_mean(raw["A"][:, -1, :N - 1], HKV).argmax(-1)
    for g, idx in enumerate(keep[0]):
        assert idx.tolist() == sorted([int(best[g]), N - 1])


@pytest.mark.parametrize("name", ["ada-snapkv", "ada-pyramidkv"])
def test_ada_snapkv_takes_the_group_mean_before_pooling(stats_and_raw, name):
    """Ada-KV's code: window mean, group mean, then max-pool; pool_order=head (SnapKV's default) pools each
    query head first. They differ: max-pool and mean do not commute."""
    st, raw = stats_and_raw
    ctx = ctx_for(st, H, HKV, D, window=W)
    mean = raw["A"][:, N - W:].mean(1)  # [H, N] window mean
    pol = build_policy(name, args={"window": str(W)})
    assert pol.scorer.pool_order == "group" and build_policy("snapkv").scorer.pool_order == "head"
    got = pol.scorer.score(st, ctx)[:, :N - W].double()
    want = ref_pool(group_mean(mean, HKV)[:, :N - W], 7, "max")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    old = build_policy(name, args={"window": str(W), "pool_order": "head"}).scorer.score(st, ctx)[:, :N - W]
    torch.testing.assert_close(old.double(), group_mean(ref_pool(mean[:, :N - W], 7, "max"), HKV),
                               rtol=1e-4, atol=1e-7)
    assert not torch.allclose(old.double(), got)
    info = {p.name: p for p in describe_policies()}[name]
    assert dict((o, d) for o, d, _ in info.options)["pool_order"] == "group"


@pytest.mark.parametrize("budget", ["5%", "20%", "12"])
def test_laprox_window_inside_or_on_top_of_the_budget(model_stats, budget):
    b = parse_budget(budget)
    inside = build_policy("laprox").select(model_stats, b, HKV, H, D)
    assert sum(i.numel() for layer in inside for i in layer) == b.total_entries(96, 3, HKV)
    top = build_policy("laprox", args={"window_budget": "outside"}).select(model_stats, b, HKV, H, D)
    # K = budget of the n - w others, plus the window in every head
    want = min(b.total_entries(96 - 32, 3, HKV) + 3 * HKV * 32, 3 * HKV * 96)
    assert sum(i.numel() for layer in top for i in layer) == want
    for layer in top:
        for idx in layer:
            assert set(range(64, 96)) <= set(idx.tolist())


def test_criticalkv_second_stage_takes_large_output_norm():
    n, window = 40, 4
    col_sum = torch.linspace(1.0, 0.1, n).expand(H, n).clone()  # attention falls with position
    l1 = torch.ones(H, n)
    l1[:, 30] = 1000.0  # low attention, huge projected value
    st = LayerStats(n=n, positions=torch.arange(n), window=window, query_position=n - 1,
                    col_sum=col_sum, value_out_l1=l1)
    pol = build_policy("criticalkv", args={"window": str(window), "kernel": "1"})
    keep = pol.select([st], parse_budget("12"), HKV, H, D)
    # 12 per head: stage one int(12 * 0.5) = 6 including the 4 window tokens -> tokens 0, 1 by attention;
    # stage two picks token 30 first, then the best remaining by attention x 1.
    for idx in keep[0]:
        kept = idx.tolist()
        assert kept[:2] == [0, 1] and 30 in kept and kept[-window:] == list(range(n - window, n))
        assert kept == sorted([0, 1, 2, 3, 4, 5, 6, 30] + list(range(n - window, n)))
    plain = build_policy("snapkv", args={"window": str(window), "kernel": "1"}).select([st], parse_budget("12"), HKV, H, D)
    assert 30 not in plain[0][0].tolist()


def test_ahakv_step_gain_is_sharper_than_model_softmax():
    d, k_budget = 64, 16
    # λ equals the model scale at i/k = e^(1/2), is larger beyond.
    assert float(sg_scale(math.exp(0.5) * k_budget, k_budget, d)) == pytest.approx(1 / math.sqrt(d), rel=1e-6)
    assert float(sg_scale(100 * k_budget, k_budget, d)) > 2 / math.sqrt(d)
    assert float(sg_scale(k_budget // 2, k_budget, d, floor=0.125)) == pytest.approx(0.125)
    # On random unit-variance q, k with i >> k the step-gain rows have lower entropy than the model's.
    gen = torch.Generator().manual_seed(5)
    n = 2000
    q = torch.randn(1, 4, d, generator=gen)
    keys = torch.randn(n, d, generator=gen)
    q_pos = torch.arange(n - 4, n)
    sg = sg_column_sums(q, q_pos, keys, torch.arange(n), k_budget)  # sum of 4 rows
    model = torch.softmax((q[0] @ keys.T) / math.sqrt(d), dim=-1)
    logits = (q[0] @ keys.T) * sg_scale(q_pos + 1, k_budget, d)[:, None]
    causal = torch.arange(n)[None, :] <= q_pos[:, None]
    sg_rows = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    torch.testing.assert_close(sg[0], sg_rows.sum(0))

    def entropy(p):
        return float(-(p * p.clamp(min=1e-30).log()).sum(-1).mean())

    assert entropy(sg_rows) < entropy(model) - 0.5
    # The expected entropy is near ln k (the derivation's target).
    assert abs(entropy(sg_rows) - math.log(k_budget)) < 0.6


# --------------------------------------------------------------------------------------------------------
# Decode-time eviction
# --------------------------------------------------------------------------------------------------------

def decode_view(n=40, d=8, G=2, r=4, seed=0, mass=None):
    gen = torch.Generator().manual_seed(seed)
    return DecodeView(keys=torch.randn(n, d, generator=gen), values=torch.randn(n, d, generator=gen),
                      positions=torch.arange(100, 100 + n),
                      key_mass=torch.rand(n, generator=gen) if mass is None else mass,
                      recent_queries=torch.randn(G, r, d, generator=gen), query_position=100 + n - 1,
                      head_dim=d, scale=d ** -0.5)


@pytest.mark.parametrize("name,reads_kv", [("tova", False), ("h2o", False), ("streaming", False), ("ahakv", True)])
def test_decode_view_gathers_keys_and_values_only_for_a_policy_that_reads_them(name, reads_kv):
    eager = decode_view(seed=3)
    calls = []

    def load_kv():
        calls.append(1)
        return eager.keys, eager.values

    lazy = DecodeView(positions=eager.positions, key_mass=eager.key_mass, recent_queries=eager.recent_queries,
                      query_position=eager.query_position, head_dim=eager.head_dim, scale=eager.scale,
                      load_kv=load_kv)
    policy = build_policy(name)
    assert torch.equal(policy.decode_keep(lazy, 12), policy.decode_keep(eager, 12))
    assert len(calls) == (1 if reads_kv else 0)  # and never twice
    assert lazy.n == 40 and lazy.device == eager.positions.device


def test_decode_view_needs_keys_or_a_loader():
    with pytest.raises(ValueError):
        DecodeView(positions=torch.arange(3), key_mass=torch.zeros(3), recent_queries=None, query_position=2,
                   head_dim=8, scale=1.0)


def test_decode_modes():
    assert build_policy("h2o").decode_mode == "accumulate"
    assert build_policy("tova").decode_mode == "last"
    assert build_policy("streaming").decode_mode == "position"
    assert build_policy("ahakv").decode_mode == "recent_queries" and build_policy("ahakv").window == 32
    assert build_policy("snapkv").decode_mode is None and build_policy("full").decode_mode is None

    view = decode_view()
    n = 40
    assert build_policy("streaming").decode_keep(view, 10).tolist() == [0, 1, 2, 3] + list(range(34, 40))
    # H2O: the 5 most recent, plus the 5 heaviest of the rest.
    keep = build_policy("h2o").decode_keep(view, 10).tolist()
    heavy = torch.argsort(view.key_mass[:35], descending=True)[:5].tolist()
    assert keep == sorted(heavy + list(range(35, 40)))
    # TOVA: the newest token plus the heaviest others.
    keep = build_policy("tova").decode_keep(view, 6).tolist()
    assert keep == sorted(torch.argsort(view.key_mass[:39], descending=True)[:5].tolist() + [39])
    assert build_policy("tova").decode_keep(view, n + 3).tolist() == list(range(n))


@pytest.mark.parametrize("old", [False, True])
def test_ahakv_decode_matches_formula(old):
    # A compressed cache: 50 keys spread over positions 0..245, so a row's absolute position (kvx's old
    # choice) is far above the number of keys it sees (the default).
    view = decode_view(n=50, d=8, G=2, r=4, seed=2)
    view.positions = torch.arange(0, 250, 5)
    view.query_position = 245
    args = {"window": "4", "kernel": "3"}
    if old:
        args.update(decode_scale="position", prior_pad="include")
    pol = build_policy("ahakv", args=args)
    keep = pol.decode_keep(view, 12).tolist()
    # Reference: step-gain rows of the 4 recent queries, group mean, times the pooled ||v||² prior.
    total = torch.zeros(50, dtype=torch.float64)
    for g in range(2):
        for t in range(4):
            pos = view.query_position - 3 + t
            seen = view.positions <= pos
            i = pos + 1 if old else int(seen.sum())
            lam = max(math.sqrt(2 * math.log(max(i / 12, 1.0)) / 8), 8 ** -0.5)
            logits = lam * (view.recent_queries[g, t].double() @ view.keys.double().T)
            total += torch.softmax(logits.masked_fill(~seen, float("-inf")), 0) / 2
    nu = view.values.double().norm(dim=-1)[:46] ** 2
    gamma = ref_pool(nu, 3, "avg", count_pad=old)
    score = total[:46] * gamma / gamma.max()
    want = sorted(torch.argsort(score, descending=True)[:8].tolist() + [46, 47, 48, 49])
    assert keep == want


def test_ahakv_decode_scale_follows_the_keys_a_row_sees():
    """Over a cache compressed to ~k keys, i = keys seen keeps λ at the model's scale (entropy near ln k);
    the absolute position would sharpen it far beyond."""
    d, k = 64, 40
    gen = torch.Generator().manual_seed(1)
    q, keys = torch.randn(1, 1, d, generator=gen), torch.randn(k + 8, d, generator=gen)
    pos = torch.arange(0, 4000, 4000 // (k + 8))[: k + 8]
    q_pos = torch.tensor([4000])

    def entropy(p):
        return float(-(p * p.clamp(min=1e-30).log()).sum())

    by_keys = sg_column_sums(q, q_pos, keys, pos, k, d ** -0.5)[0]
    by_pos = sg_column_sums(q, q_pos, keys, pos, k, d ** -0.5, visible="position")[0]
    torch.testing.assert_close(by_keys, torch.softmax(q[0, 0] @ keys.T / math.sqrt(d), 0))
    assert entropy(by_pos) < entropy(by_keys) - 0.5


# --------------------------------------------------------------------------------------------------------
# Allocators
# --------------------------------------------------------------------------------------------------------

def random_layers(rng: random.Random, gen: torch.Generator) -> list[LayerCandidates]:
    L, hkv, n = rng.randint(1, 6), rng.randint(1, 4), rng.randint(1, 120)
    protected = rng.choice([0, 0, 1, 4, rng.randint(0, n)])
    scale = [10 ** rng.uniform(-3, 3) for _ in range(L)]
    return [LayerCandidates(torch.rand(hkv, n - protected, generator=gen) * scale[l], protected, n) for l in range(L)]


@pytest.mark.parametrize("alloc", [UniformAllocator(), PyramidAllocator(), AdaAllocator(),
                                   AdaAllocator(schedule="pyramid", alpha=0.5), GlobalAllocator()],
                         ids=["uniform", "pyramid", "ada", "ada-pyramid", "global"])
def test_allocator_totals_are_exact(alloc):
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    for _ in range(150):
        layers = random_layers(rng, gen)
        heads = sum(layer.num_kv_heads for layer in layers)
        n = layers[0].n
        total = rng.randint(heads, heads * n)
        counts = alloc.allocate(layers, total)
        assert [len(c) for c in counts] == [layer.num_kv_heads for layer in layers]
        flat = [c for layer in counts for c in layer]
        assert sum(flat) == total
        assert all(0 <= c <= n for c in flat)
        floor = layers[0].floor
        if floor * heads <= total:
            assert min(flat) >= floor  # protected tokens (and at least one) survive whenever they fit


def test_ada_respects_floor_and_moves_budget_to_peaked_heads():
    gen = torch.Generator().manual_seed(0)
    hkv, n, protected = 4, 200, 8
    scores = torch.rand(hkv, n - protected, generator=gen) * 0.01
    scores[0] += 1.0  # head 0 dominates the joint top-B
    layers = [LayerCandidates(scores.clone(), protected, n) for _ in range(3)]
    total = 3 * hkv * 40
    for alpha in (0.2, 0.5):
        counts = AdaAllocator(alpha=alpha).allocate(layers, total)
        extra_per_head = (40 - protected)
        for layer in counts:
            assert sum(layer) == hkv * 40
            assert min(layer) >= protected + math.floor(alpha * extra_per_head)
            assert layer[0] == max(layer) and layer[0] > 40
        # The winner head gets f_g = all 4*32 extras: B_0 = 8 + (1-α)*128 + α*32.
        assert counts[0][0] == round(protected + (1 - alpha) * hkv * extra_per_head + alpha * extra_per_head)


def test_global_allocator_follows_score_shapes_across_layers_and_heads():
    hkv, n = 2, 100
    peaked = torch.full((hkv, n), 1e-6)
    peaked[:, :3] = 1.0  # layer 0: all its mass on three tokens per head
    flat = torch.ones(hkv, n)  # layer 1: mass spread evenly
    skewed = torch.ones(hkv, n)
    skewed[1] *= 1e-3  # layer 2: head 0 carries nearly all the mass
    layers = [LayerCandidates(s, 0, n) for s in (peaked, flat, skewed)]
    total = 3 * hkv * 30
    counts = GlobalAllocator().allocate(layers, total)
    assert sum(map(sum, counts)) == total
    assert max(counts[0]) <= 4  # the peaked layer needs few entries
    assert sum(counts[1]) > 4 * sum(counts[0])
    assert counts[2][0] > 10 * counts[2][1]
    # Layer normalisation: scaling a whole layer changes nothing.
    scaled = [LayerCandidates(s * f, 0, n) for s, f in zip((peaked, flat, skewed), (1e4, 1e-4, 3.0))]
    assert GlobalAllocator().allocate(scaled, total) == counts


def test_pyramid_follows_its_schedule():
    L, hkv, n, protected = 8, 2, 1000, 32
    layers = [LayerCandidates(torch.rand(hkv, n - protected), protected, n) for _ in range(L)]
    for per_head in (64, 128, 600, 990):
        total = L * hkv * per_head
        counts = PyramidAllocator(beta=20).allocate(layers, total)
        per_layer = [sum(c) / hkv for c in counts]
        assert sum(map(sum, counts)) == total  # mean = budget
        assert all(a >= b for a, b in zip(per_layer, per_layer[1:]))  # decreasing with depth
        assert all(max(c) - min(c) <= 1 for c in counts)  # uniform within a layer
        schedule = pyramid_schedule(per_head, protected, n - protected, L, 20)
        for got, b in zip(per_layer, schedule):
            assert abs(got - (b + protected)) <= 1.0
        assert per_layer[0] > per_layer[-1]
    # The formula itself: b_min = b̄/β at the top of the stack, mean b̄.
    s = pyramid_schedule(132, 32, 968, 8, 20)
    assert s[-1] == pytest.approx(5.0) and sum(s) / 8 == pytest.approx(100.0)
    assert s[0] == pytest.approx(195.0)


def test_rounding_helpers():
    assert spread_evenly(10, [3, 3, 3, 3]) == [3, 3, 2, 2]
    assert spread_evenly(7, [1, 5, 5]) == [1, 3, 3]
    assert spread_evenly(100, [1, 2]) == [1, 2]
    got = round_to_total(torch.tensor([0.5, 1.5, 2.0]), torch.zeros(3), torch.full((3,), 5), 4)
    assert sum(got) == 4 and got == [1, 1, 2]


# --------------------------------------------------------------------------------------------------------
# Policies end to end on statistics
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_stats():
    stats = [make_stats(H, HKV, 96, D, window=32, sg_rows=32, sg_budget=10, seed=10 + l)[0] for l in range(3)]
    for layer, st in enumerate(stats):  # KVzip's reconstruction column max (runtime/compression/reconstruction.py)
        st.col_max = torch.rand(H, 96, generator=torch.Generator().manual_seed(layer))
    return stats


@pytest.mark.parametrize("name", [p for p in POLICY_NAMES if p != "full"])
@pytest.mark.parametrize("allocation", [None] + ALLOCATOR_NAMES)
def test_every_policy_and_allocation_keeps_exactly_the_budget(model_stats, name, allocation):
    pol = build_policy(name, allocation)
    for budget in ("1", "10%", "40", "77%"):
        b = parse_budget(budget)
        keep = pol.select(model_stats, b, HKV, H, D)
        assert len(keep) == 3 and all(len(layer) == HKV for layer in keep)
        total = sum(idx.numel() for layer in keep for idx in layer)
        assert total == b.total_entries(96, 3, HKV)
        for layer in keep:
            for idx in layer:
                assert idx.dtype == torch.int64 and idx.numel() >= 1
                assert torch.equal(idx, torch.unique(idx)) and int(idx.max()) < 96
                if pol.window and idx.numel() >= pol.window + pol.sinks:
                    assert set(range(96 - pol.window, 96)) <= set(idx.tolist())


def test_statistics_from_the_kernels_match_and_feed_every_policy():
    """kvx.kernels.stats computes what this file's make_stats does, and every policy runs on its output."""
    from kvx.kernels.stats import StatsRequest, compute_layer_stats

    n, scale = 64, D ** -0.5
    mine, raw = make_stats(H, HKV, n, D, window=8, sg_rows=8, sg_budget=8, seed=4)
    pos = torch.arange(n)
    full_req = StatsRequest(window=8, window_sq=True, last_row=True, colsum_all=True, sg_rows=8, sg_budget=8,
                            key_norm=True, value_norm=True, value_out_norm=True, value_out_l1=True,
                            query_moments=True)
    theirs = compute_layer_stats(full_req, raw["q"], raw["k"], raw["v"], pos, pos, scale, None, raw["q"],
                                 o_proj_weight=raw["wo"])
    for name in ("col_sum", "col_sq", "last_row", "colsum_all", "colsum_count", "col_sum_sg", "key_norm",
                 "value_norm", "value_out_norm", "value_out_l1", "q_mean", "q_cov"):
        torch.testing.assert_close(getattr(theirs, name).double(), getattr(mine, name).double(), rtol=1e-4,
                                   atol=1e-5, msg=name)
    budget = parse_budget("25%")
    for name in POLICY_NAMES:
        pol = build_policy(name)
        req = pol.request_for(budget, n)
        stats = []
        for layer in range(2):
            st = compute_layer_stats(req, raw["q"], raw["k"], raw["v"], pos, pos, scale, None, raw["q"],
                                     o_proj_weight=raw["wo"])
            if getattr(st, "keys", None) is None:
                st.keys = raw["k"]  # ExpectedAttention reads the post-RoPE keys (not yet a LayerStats field)
            if req.reconstruction:  # KVzip: the column max its reconstruction pass fills in (here: these rows)
                from kvx.kernels.stats import col_max_over_rows

                st.col_max = col_max_over_rows(raw["q"], raw["k"], pos, pos, scale)
            stats.append(st)
        keep = pol.select(stats, budget, HKV, H, D)
        kept = sum(idx.numel() for layer in keep for idx in layer)
        assert kept == (budget.total_entries(n, 2, HKV) if name != "full" else 2 * HKV * n)


def test_budget_that_keeps_everything_returns_all(model_stats):
    for name in ("snapkv", "laprox", "full"):
        keep = build_policy(name).select(model_stats, parse_budget("100%"), HKV, H, D)
        assert all(idx.tolist() == list(range(96)) for layer in keep for idx in layer)
    keep = build_policy("h2o").select(model_stats, parse_budget("96"), HKV, H, D)
    assert all(idx.numel() == 96 for layer in keep for idx in layer)


def test_h2o_splits_heavy_and_recent(model_stats):
    keep = build_policy("h2o").select(model_stats[:1], parse_budget("20"), HKV, H, D)
    score = group_mean(model_stats[0].colsum_all.double(), HKV)
    for g, idx in enumerate(keep[0]):
        heavy = torch.argsort(score[g, :86], descending=True)[:10].tolist()
        assert idx.tolist() == sorted(heavy + list(range(86, 96)))


def test_protected_tokens_truncate_when_the_budget_is_smaller():
    st, _ = make_stats(H, HKV, 50, D, window=32)
    keep = build_policy("snapkv").select([st], parse_budget("5"), HKV, H, D)
    assert all(idx.tolist() == list(range(45, 50)) for idx in keep[0])


def test_request_for_fills_ahakv_budget():
    pol = build_policy("ahakv")
    assert pol.request.sg_rows == 32 and pol.request.value_norm
    assert pol.request_for(parse_budget("10%"), 1000).sg_budget == 100
    assert build_policy("snapkv").request_for(parse_budget("10%"), 1000).window == 32
    req = build_policy("laprox").request
    assert req.window == 32 and req.window_sq and req.value_out_norm
    assert build_policy("h2o").request.colsum_all and build_policy("tova").request.last_row
    assert build_policy("criticalkv").request.value_out_l1 and build_policy("knorm").request.key_norm
    assert build_policy("expected-attention").request.query_moments


# --------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------

def test_names_and_descriptions():
    assert POLICY_NAMES[:13] == ["full", "streaming", "h2o", "snapkv", "pyramidkv", "ada-snapkv", "ada-pyramidkv",
                                 "tova", "knorm", "expected-attention", "criticalkv", "ahakv", "laprox"]
    assert "random" in POLICY_NAMES
    assert set(SCORER_NAMES) == {"random", "streaming", "h2o", "snapkv", "tova", "knorm", "expected-attention",
                                 "criticalkv", "ahakv", "laprox", "kvzip"}
    assert ALLOCATOR_NAMES == ["uniform", "pyramid", "ada", "global"]
    infos = describe_policies()
    assert [i.name for i in infos] == POLICY_NAMES
    for info in infos:
        assert info.one_line and info.paper and info.stats and set(info.phases) <= {"prefill", "decode"}
    by_name = {i.name: i for i in infos}
    assert "decode" in by_name["h2o"].phases and "2506.03762" in by_name["ahakv"].paper
    assert dict((o, d) for o, d, _ in by_name["ada-pyramidkv"].options)["schedule"] == "pyramid"


def test_build_policy_defaults_and_overrides():
    assert build_policy("pyramidkv").allocator.name == "pyramid"
    assert build_policy("laprox").allocator.name == "global"
    ada_pyr = build_policy("ada-pyramidkv")
    assert ada_pyr.allocator.name == "ada" and ada_pyr.allocator.schedule == "pyramid"
    pol = build_policy("expected-attention", "ada", {"alpha": "0.3", "sinks": "2"})
    assert pol.allocator.alpha == 0.3 and pol.sinks == 2
    pol = build_policy("SnapKV", args={"window": "16", "kernel": "5", "pooling": "AVG"})
    assert (pol.window, pol.scorer.kernel, pol.scorer.pooling) == (16, 5, "avg")
    assert build_policy("h2o", args={"recent": "auto"}).scorer.recent is None
    assert build_policy("h2o", args={"recent": "7"}).scorer.recent == 7
    assert build_policy("random", args={"seed": "3"}).scorer.seed == 3
    assert build_policy("full").scorer is None


@pytest.mark.parametrize("name, allocation, args, fragment", [
    ("snapkvv", None, None, "unknown policy"),
    ("snapkv", "pyramidal", None, "unknown allocation"),
    ("snapkv", None, {"windw": "3"}, "valid options"),
    ("snapkv", None, {"window": "abc"}, "whole number"),
    ("snapkv", None, {"window": "0"}, "at least 1"),
    ("snapkv", None, {"pooling": "median"}, "max, avg"),
    ("ada-snapkv", None, {"alpha": "2"}, "at most 1"),
    ("snapkv", None, {"alpha": "0.3"}, "belongs to allocation ada"),
    ("h2o", None, {"normalize": "maybe"}, "true or false"),
    ("criticalkv", None, {"eps": "nan"}, "finite"),
    ("full", None, {"window": "3"}, "no options"),
    ("streaming", None, {"window": "3"}, "valid options: heads, sinks"),
])
def test_build_policy_errors(name, allocation, args, fragment):
    with pytest.raises(KvxError) as info:
        build_policy(name, allocation, args)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_unknown_policy_lists_the_valid_names():
    with pytest.raises(KvxError) as info:
        build_policy("nope")
    assert all(name in str(info.value) for name in POLICY_NAMES)


def test_policy_specs_with_options():
    from kvx.policies.registry import parse_policy_spec, policy_label, split_policy_list

    assert split_policy_list("snapkv, ahakv[score_kernel=15,window=64],tova[heads=layer]") == [
        "snapkv", "ahakv[score_kernel=15,window=64]", "tova[heads=layer]"]
    assert parse_policy_spec("AhaKV[score_kernel=15, window=64]") == ("ahakv", {"score_kernel": "15", "window": "64"})
    assert parse_policy_spec("snapkv") == ("snapkv", {})
    assert policy_label("ahakv", {"score_kernel": "15"}) == "ahakv[score_kernel=15]"
    for bad, message in [("snapkv[window=3", "unclosed"), ("snapkv]", "unbalanced")]:
        with pytest.raises(KvxError, match=message):
            split_policy_list(bad)
    for bad, message in [("snapkv[window]", "key=value"), ("snapkv[window=3]x", "brackets")]:
        with pytest.raises(KvxError, match=message):
            parse_policy_spec(bad)

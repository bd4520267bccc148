"""compute_layer_stats / wo_gram against naive float64 references that build the full masked softmax."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from kvx.errors import KvxError
from kvx.kernels import stats as stats_mod
from kvx.kernels.stats import LayerStats, StatsRequest, compute_layer_stats, sg_scales, wo_gram

RTOL, ATOL = 1e-5, 1e-6

EVERYTHING = StatsRequest(
    window=9, window_sq=True, last_row=True, colsum_all=True, sg_rows=7, sg_budget=0,  # budget set per case
    key_norm=True, value_norm=True, value_out_norm=True, value_out_l1=True, query_moments=True,
)


# --- naive references (float64, full [H, T, S] matrices) ----------------------------------------------------


def full_probs(q, k, q_pos, k_pos, row_scale, sliding_window):
    """[H, T, S] float64 softmax with per-row scale [T]; rows that see nothing are zero."""
    H, T, d = q.shape
    G = H // k.shape[0]
    kk = k.double().repeat_interleave(G, dim=0)
    logits = torch.einsum("htd,hsd->hts", q.double(), kk) * row_scale.double().view(1, T, 1)
    diff = q_pos[:, None] - k_pos[None, :]
    visible = diff >= 0
    if sliding_window is not None:
        visible &= diff < sliding_window
    logits = logits.masked_fill(~visible, float("-inf"))
    return torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0), visible


def hand_lambda(i: int, budget: int, d: int, scale: float) -> float:
    if i <= budget:
        return scale
    return max(math.sqrt(2.0 * math.log(i / budget) / d), scale)


def wo_heads64(o_proj, H, d):
    return [o_proj.double()[:, h * d:(h + 1) * d].T for h in range(H)]  # each [d, D]


def reference_stats(req, q, k, v, q_pos, k_pos, scale, sliding_window, q_pre, o_proj):
    H, T, d = q.shape
    G = H // k.shape[0]
    ref = {}
    A, visible = full_probs(q, k, q_pos, k_pos, torch.full((T,), scale, dtype=torch.float64), sliding_window)
    w = min(req.window, T)
    if w:
        ref["col_sum"] = A[:, T - w:].sum(1)
        if req.window_sq:
            ref["col_sq"] = (A[:, T - w:] ** 2).sum(1)
    if req.last_row:
        ref["last_row"] = A[:, -1]
    if req.colsum_all:
        ref["colsum_all"] = A.sum(1)
        ref["colsum_count"] = visible.double().sum(0)
    if req.sg_rows:
        lam = torch.tensor([hand_lambda(int(p) + 1, req.sg_budget, d, scale) for p in q_pos], dtype=torch.float64)
        P, _ = full_probs(q, k, q_pos, k_pos, lam, sliding_window)
        ref["col_sum_sg"] = P[:, T - min(req.sg_rows, T):].sum(1)
    vv = v.double().repeat_interleave(G, dim=0)
    if req.key_norm:
        ref["key_norm"] = k.double().norm(dim=-1)
    if req.value_norm:
        ref["value_norm"] = v.double().norm(dim=-1)
    heads = wo_heads64(o_proj, H, d)
    if req.value_out_norm:
        ref["value_out_norm"] = torch.stack([(vv[h] @ heads[h]).norm(dim=-1) for h in range(H)])
    if req.value_out_l1:
        ref["value_out_l1"] = torch.stack([(vv[h] @ heads[h]).abs().sum(-1) for h in range(H)])
    if req.query_moments:
        keep = q_pos >= 4
        qs = q_pre.double()[:, keep] if bool(keep.any()) else q_pre.double()
        mean = qs.mean(1)
        c = qs - mean[:, None]
        ref["q_mean"] = mean
        ref["q_cov"] = torch.einsum("htd,hte->hde", c, c) / qs.shape[1]
    return ref


def make_inputs(H, Hkv, S, T, d, seed, k_pos=None, q_pos=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H, T, d, generator=g) * 1.5
    k = torch.randn(Hkv, S, d, generator=g)
    v = torch.randn(Hkv, S, d, generator=g)
    q_pre = torch.randn(H, T, d, generator=g) + 0.5
    o_proj = torch.randn(3 * d + 5, H * d, generator=g) / math.sqrt(H * d)
    k_pos = torch.arange(S) if k_pos is None else k_pos
    q_pos = k_pos[S - T:] if q_pos is None else q_pos  # queries are the last T keys (prefill)
    return q, k, v, q_pos, k_pos, q_pre, o_proj


def check_all(got: LayerStats, ref: dict):
    for name, expected in ref.items():
        actual = getattr(got, name)
        assert actual is not None, name
        assert actual.dtype == torch.float32, name
        assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
        torch.testing.assert_close(actual.double(), expected, rtol=RTOL, atol=ATOL, msg=name)
    for f in fields(LayerStats):
        if f.name not in ref and f.name not in ("n", "positions", "window", "query_position", "protected_prefix"):
            assert getattr(got, f.name) is None, f"{f.name} computed without being requested"


CASES = [
    # H, Hkv, S, T, d, sliding_window, scale, sg_budget
    (4, 4, 37, 37, 16, None, None, 20),  # MHA, odd length, full prefill
    (6, 2, 53, 20, 8, 11, None, 30),  # GQA 3, queries = last 20 of 53 keys, sliding window
    (8, 2, 70, 70, 32, None, 0.3, 40),  # GQA 4, non-default scale
    (8, 2, 45, 13, 16, 6, None, 10),  # GQA 4, few rows (< window, sg_rows partly), small window
    (3, 1, 29, 29, 8, 40, None, 100),  # window larger than the sequence; budget above every i
]


@pytest.mark.parametrize("H,Hkv,S,T,d,sw,scale,sg_budget", CASES)
def test_every_statistic_matches_naive_reference(H, Hkv, S, T, d, sw, scale, sg_budget):
    scale = 1 / math.sqrt(d) if scale is None else scale
    req = StatsRequest(**{**EVERYTHING.__dict__, "sg_budget": sg_budget})
    q, k, v, q_pos, k_pos, q_pre, o_proj = make_inputs(H, Hkv, S, T, d, seed=H * 1000 + S)
    got = compute_layer_stats(req, q, k, v, q_pos, k_pos, scale, sw, q_pre_rope=q_pre, o_proj_weight=o_proj)
    ref = reference_stats(req, q, k, v, q_pos, k_pos, scale, sw, q_pre, o_proj)
    check_all(got, ref)
    assert got.n == S
    assert torch.equal(got.positions, k_pos)
    assert got.window == min(req.window, T)
    assert got.query_position == int(q_pos[-1])


@pytest.mark.parametrize("row_chunk", [256, 1])
def test_compressed_cache_positions_and_blind_rows(monkeypatch, row_chunk):
    """Keys at scattered positions (an already compressed cache); the first query row sees no key."""
    monkeypatch.setattr(stats_mod, "ROW_CHUNK", row_chunk)
    H, Hkv, d = 6, 3, 16
    k_pos = torch.tensor([3, 4, 9, 10, 11, 20, 21, 22, 30, 31, 32, 33])
    q_pos = torch.tensor([2, 25, 31, 33])
    q, k, v, _, _, q_pre, o_proj = make_inputs(H, Hkv, len(k_pos), len(q_pos), d, seed=7, k_pos=k_pos, q_pos=q_pos)
    req = StatsRequest(window=4, window_sq=True, last_row=True, colsum_all=True, sg_rows=4, sg_budget=5)
    scale = d ** -0.5
    got = compute_layer_stats(req, q, k, v, q_pos, k_pos, scale, sliding_window=9)
    ref = reference_stats(req, q, k, v, q_pos, k_pos, scale, 9, q_pre, o_proj)
    check_all(got, ref)
    assert torch.isfinite(got.col_sum).all()
    assert got.query_position == 33


def test_last_row_alone_and_window_alone():
    q, k, v, q_pos, k_pos, q_pre, o_proj = make_inputs(8, 2, 41, 17, 16, seed=3)
    scale = 0.25
    for req in (StatsRequest(last_row=True), StatsRequest(window=5), StatsRequest(window=5, last_row=True)):
        got = compute_layer_stats(req, q, k, v, q_pos, k_pos, scale, 13)
        check_all(got, reference_stats(req, q, k, v, q_pos, k_pos, scale, 13, q_pre, o_proj))


def test_requesting_nothing_returns_all_none():
    q, k, v, q_pos, k_pos, q_pre, o_proj = make_inputs(4, 2, 10, 10, 8, seed=1)
    got = compute_layer_stats(StatsRequest(), q, k, v, q_pos, k_pos, 0.35, q_pre_rope=q_pre, o_proj_weight=o_proj)
    for f in fields(LayerStats):
        if f.name not in ("n", "positions", "window", "query_position", "protected_prefix"):
            assert getattr(got, f.name) is None, f.name
    assert got.n == 10 and got.window == 0 and got.query_position == 9 and got.protected_prefix == 0


@pytest.mark.parametrize("row_chunk", [1, 7, 20])
def test_chunk_boundaries_do_not_change_results(monkeypatch, row_chunk):
    monkeypatch.setattr(stats_mod, "ROW_CHUNK", row_chunk)
    monkeypatch.setattr(stats_mod, "GRAM_KEY_TILE", 5)
    monkeypatch.setattr(stats_mod, "L1_TILE_ELEMENTS", 6 * 8 * 29 * 3)  # 3 keys per tile
    H, Hkv, S, T, d = 6, 2, 47, 40, 8
    req = StatsRequest(**{**EVERYTHING.__dict__, "window": 23, "sg_rows": 21, "sg_budget": 15})
    q, k, v, q_pos, k_pos, q_pre, o_proj = make_inputs(H, Hkv, S, T, d, seed=11)
    o_proj = o_proj[:29]
    got = compute_layer_stats(req, q, k, v, q_pos, k_pos, d ** -0.5, 17, q_pre_rope=q_pre, o_proj_weight=o_proj)
    check_all(got, reference_stats(req, q, k, v, q_pos, k_pos, d ** -0.5, 17, q_pre, o_proj))


def test_colsum_all_with_more_rows_than_default_chunk():
    assert stats_mod.ROW_CHUNK < 300
    H, Hkv, S, d = 4, 1, 300, 8
    q, k, v, q_pos, k_pos, q_pre, o_proj = make_inputs(H, Hkv, S, S, d, seed=5)
    req = StatsRequest(colsum_all=True, window=32, sg_rows=32, sg_budget=100)
    got = compute_layer_stats(req, q, k, v, q_pos, k_pos, d ** -0.5)
    check_all(got, reference_stats(req, q, k, v, q_pos, k_pos, d ** -0.5, None, q_pre, o_proj))
    torch.testing.assert_close(got.colsum_count, torch.arange(S, 0, -1, dtype=torch.float32))
    # every row is a distribution: total mass equals the number of rows per head
    torch.testing.assert_close(got.colsum_all.sum(-1), torch.full((H,), float(S)), rtol=1e-5, atol=0)


def test_wo_gram_norm_equals_explicit_product():
    g = torch.Generator().manual_seed(2)
    H, Hkv, d, D, S = 6, 2, 8, 40, 19
    o_proj = torch.randn(D, H * d, generator=g)
    v = torch.randn(Hkv, S, d, generator=g)
    gram = wo_gram(o_proj, H, d)
    assert gram.shape == (H, d, d) and gram.dtype == torch.float32
    for h in range(H):
        w_h = o_proj[:, h * d:(h + 1) * d].T  # [d, D]
        torch.testing.assert_close(gram[h], w_h @ w_h.T, rtol=1e-5, atol=1e-4)
    explicit = torch.stack([(v[h // 3].double() @ o_proj.double()[:, h * d:(h + 1) * d].T).norm(dim=-1)
                            for h in range(H)])
    q = torch.randn(H, 1, d, generator=g)
    req = StatsRequest(value_out_norm=True)
    pos = torch.arange(S)
    via_gram = compute_layer_stats(req, q, v, v, pos[-1:], pos, 0.3, gram=gram).value_out_norm
    via_weight = compute_layer_stats(req, q, v, v, pos[-1:], pos, 0.3, o_proj_weight=o_proj).value_out_norm
    torch.testing.assert_close(via_gram.double(), explicit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_weight, via_gram)


def test_wo_gram_rejects_wrong_shape():
    with pytest.raises(KvxError):
        wo_gram(torch.zeros(16, 30), num_heads=4, head_dim=8)


def test_sg_lambda_by_hand():
    d, budget = 64, 100
    scale = 1 / math.sqrt(d)
    # position 799 -> i = 800 keys seen: lambda = sqrt(2 ln 8 / 64) = 0.254917...
    lam = sg_scales(torch.tensor([799, 150, 50, 163, 164]), budget, d, scale)
    assert lam[0].item() == pytest.approx(math.sqrt(2 * math.log(8.0) / 64), rel=1e-6)
    assert lam[0].item() == pytest.approx(0.254917, abs=1e-6)
    # i / budget = 1.51 < e^0.5: the formula (0.1132) would be flatter than the model; clamped to 1/8
    assert lam[1].item() == pytest.approx(scale, rel=1e-6)
    # i <= budget: formula undefined, model scale
    assert lam[2].item() == pytest.approx(scale, rel=1e-6)
    # around e^0.5 * 100 = 164.87: i = 164 stays at the scale, i = 165 exceeds it
    assert lam[3].item() == pytest.approx(scale, rel=1e-6)
    assert lam[4].item() > scale and lam[4].item() == pytest.approx(math.sqrt(2 * math.log(1.65) / 64), rel=1e-6)
    with pytest.raises(KvxError):
        sg_scales(torch.tensor([10]), 0, d, scale)


def test_sg_colsum_of_one_row_by_hand():
    """One query row, two keys: softmax of lambda * raw logits, lambda from the formula."""
    d, budget = 4, 2
    q = torch.tensor([[[1.0, 0.0, 2.0, 0.0]]])  # [1, 1, 4]
    k = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]]])
    k_pos = torch.tensor([0, 5, 9])
    q_pos = torch.tensor([9])  # i = 10 keys seen -> lambda = sqrt(2 ln 5 / 4)
    lam = math.sqrt(2 * math.log(5.0) / 4)
    raw = [1.0, 2.0, 3.0]
    z = sum(math.exp(lam * x) for x in raw)
    expected = torch.tensor([[math.exp(lam * x) / z for x in raw]])
    got = compute_layer_stats(StatsRequest(sg_rows=4, sg_budget=budget), q, k, k, q_pos, k_pos, 0.5)
    torch.testing.assert_close(got.col_sum_sg, expected, rtol=1e-6, atol=1e-7)


def test_query_moments_exclude_sinks_and_fall_back():
    g = torch.Generator().manual_seed(9)
    q_pre = torch.randn(2, 10, 4, generator=g)
    q = torch.randn(2, 10, 4, generator=g)
    kv = torch.randn(1, 10, 4, generator=g)
    pos = torch.arange(10)
    got = compute_layer_stats(StatsRequest(query_moments=True), q, kv, kv, pos, pos, 0.5, q_pre_rope=q_pre)
    rows = q_pre[:, 4:].double()
    torch.testing.assert_close(got.q_mean.double(), rows.mean(1), rtol=1e-5, atol=1e-6)
    for h in range(2):
        torch.testing.assert_close(got.q_cov[h].double(), torch.cov(rows[h].T, correction=0), rtol=1e-5, atol=1e-6)
    # all rows are sinks: use all of them
    few = compute_layer_stats(StatsRequest(query_moments=True), q[:, :3], kv[:, :3], kv[:, :3], pos[:3], pos[:3],
                              0.5, q_pre_rope=q_pre[:, :3])
    torch.testing.assert_close(few.q_mean, q_pre[:, :3].mean(1))


def test_merge_is_the_union():
    a = StatsRequest(window=32, window_sq=True, sg_rows=16, sg_budget=100)
    b = StatsRequest(window=8, last_row=True, sg_rows=32, sg_budget=50, value_out_l1=True)
    m = a.merge(b)
    assert m == b.merge(a)
    assert m == StatsRequest(window=32, window_sq=True, last_row=True, sg_rows=32, sg_budget=100, value_out_l1=True)
    assert m.needs_attention
    assert StatsRequest().merge(StatsRequest()) == StatsRequest()
    assert not StatsRequest(key_norm=True, query_moments=True).needs_attention

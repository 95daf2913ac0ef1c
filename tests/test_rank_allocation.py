"""Rank allocation and importance scores against direct float64 computation."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wsvd_passes.algorithms.finetune import fisher_finetune, fisher_weighted_error, normalized_fisher
from wsvd_passes.algorithms.lowrank import make_scaling, split_groups
from wsvd_passes.algorithms.rank_allocation import (
    ImportanceAccumulator,
    above_break_even,
    achieved_rho1,
    cache_cost,
    importance_ranks,
    uniform_ranks,
)
from wsvd_passes.compression.calibration import InputStats
from wsvd_passes.errors import WsvdError


def _groups(seed, e=20, head_dim=4, heads=(3, 1)):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, e, generator=g, dtype=torch.float64)
    stats = InputStats(X.T @ X / 200, X.abs().mean(0), 200)
    nq, nkv = heads
    weights = {"q": torch.randn(nq * head_dim, e, generator=g), "k": torch.randn(nkv * head_dim, e, generator=g),
               "v": torch.randn(nkv * head_dim, e, generator=g)}
    return split_groups(0, weights, make_scaling(stats, "whiten", e), "head", head_dim), weights


@settings(max_examples=10)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 5))
def test_importance_projection_matches_direct_float64(seed, n):
    groups, weights = _groups(seed)
    acc = ImportanceAccumulator(groups, head_dim=4)
    torch.manual_seed(seed + 1)
    samples = [{(0, p): torch.randn_like(w, dtype=torch.float32) for p, w in weights.items()} for _ in range(n)]
    for s in samples:
        acc(s)
    scores = acc.scores()
    for grp in groups:
        G = [s[(0, grp.name)][grp.head * 4 : (grp.head + 1) * 4].double() for s in samples]
        direct = torch.stack([torch.diagonal(grp.U.T @ (Gs @ grp.scaling.inv.T) @ grp.Vh.T) for Gs in G])
        expected = grp.sigma * direct.square().mean(0).sqrt()
        torch.testing.assert_close(scores[grp.key], expected, rtol=1e-4, atol=1e-6)


def test_importance_allocation_budget_min_rank_non_prefix_and_ties():
    groups, _ = _groups(0)
    scores = {g.key: torch.zeros(len(g.sigma)) for g in groups}
    first, second = groups[0], groups[1]
    scores[first.key] = torch.tensor([1.0, 0.1, 9.0, 8.0])  # best components are not a prefix
    scores[second.key] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # ties
    kept = importance_ranks(groups, scores, 0.5)
    # 5 groups of 4x20, budget 0.5 * 400 = 200 parameters = 8 components of 24: one per group first,
    # then the three best of the rest: 8.0 (first, index 3) and two of the tied 5.0s (second, in index order).
    assert kept[first.key].tolist() == [2, 3]  # not a prefix of the spectrum
    assert kept[second.key].tolist() == [0, 1, 2]
    assert all(kept[g.key].tolist() == [0] for g in groups[2:])
    assert achieved_rho1(groups, kept) == pytest.approx(8 * 24 / 400)
    assert all(torch.equal(kept[k], v) for k, v in importance_ranks(groups, scores, 0.5).items())  # deterministic


def test_allocation_edge_cases():
    groups, _ = _groups(1)
    with pytest.raises(WsvdError, match="outside \\(0, 1\\]"):
        uniform_ranks(groups, 0.0)
    with pytest.raises(WsvdError, match="below the minimum"):
        importance_ranks(groups, {g.key: g.sigma for g in groups}, 0.01)
    full = importance_ranks(groups, {g.key: g.sigma for g in groups}, 1.0)
    # e=20, H=4: break-even rank 20*4/24 = 3.33, so heads that win 4 components are above it
    assert above_break_even(groups, full) == [g.key for g in groups if len(full[g.key]) == 4]


def test_fisher_finetune_lowers_weighted_error_and_keeps_padding_zero():
    torch.manual_seed(0)
    groups, weights = _groups(2)
    heads = [g for g in groups if g.name == "q"]
    factors = [g.factors(torch.arange(2)) for g in heads]
    up = torch.stack([torch.nn.functional.pad(u, (0, 1)) for u, _ in factors]).float()  # one padded slot
    down = torch.stack([torch.nn.functional.pad(d, (0, 0, 0, 1)) for _, d in factors]).float()
    W = torch.stack([g.weight for g in heads]).float()
    F = torch.rand_like(W) ** 4 * 1e-10  # realistic magnitude and spread
    new_up, new_down, losses = fisher_finetune(W, F, up, down, steps=200, lr=1e-3)
    assert losses["loss_after"] < 0.9 * losses["loss_before"]
    assert float(fisher_weighted_error(W, F, new_up, new_down).sum()) < float(fisher_weighted_error(W, F, up, down).sum())
    assert torch.count_nonzero(new_up[..., 2]) == 0 and torch.count_nonzero(new_down[:, 2]) == 0


def test_fisher_finetune_follows_adam_on_the_autograd_loss_in_float64():
    # the closed-form gradient and fused Adam against autograd + the reference Adam in float64, on awkward sizes
    # (3 groups of 5 x 7, rank 2 plus a padded slot, column-major factors as an SVD returns them)
    g = torch.Generator().manual_seed(5)
    W, F = torch.randn(3, 5, 7, generator=g), torch.rand(3, 5, 7, generator=g) ** 4 * 1e-10
    up = torch.nn.functional.pad(torch.randn(3, 5, 2, generator=g), (0, 1)).transpose(1, 2).contiguous().transpose(1, 2)
    down = torch.nn.functional.pad(torch.randn(3, 2, 7, generator=g), (0, 0, 0, 1))
    A, B = (t.double().clone().requires_grad_(True) for t in (up, down))
    opt = torch.optim.Adam([A, B], lr=1e-2)
    Fn = normalized_fisher(F).double()
    for _ in range(30):
        opt.zero_grad()
        fisher_weighted_error(W.double(), Fn, A, B).sum().backward()
        opt.step()
    new_up, new_down, losses = fisher_finetune(W, F, up, down, steps=30, lr=1e-2)
    torch.testing.assert_close(new_up.double(), A.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(new_down.double(), B.detach(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(new_up, up, atol=1e-3)  # it moved
    assert losses["loss_after"] == pytest.approx(float(fisher_weighted_error(W.double(), Fn, A, B).sum()), rel=1e-4)


def _cache_use(groups, kept):
    return sum(cache_cost(g) * len(kept[g.key]) for g in groups)


def _random_scores(groups, seed):
    g = torch.Generator().manual_seed(seed)
    return {grp.key: torch.rand(len(grp.sigma), generator=g, dtype=torch.float64) for grp in groups}


# heads (3, 1), head dim 4: the dense cache is 2 * 1 * 4 = 8 values per token; one component per k and v head
# is the least any allocation keeps (rho2 0.25)
CACHE_DENSE = 8


@settings(max_examples=25)
@given(seed=st.integers(0, 10**6), r_lo=st.floats(0.25, 1.0), r_hi=st.floats(0.25, 1.0),
       rho1=st.one_of(st.none(), st.floats(0.3, 1.0)))
def test_cache_budget_is_respected_and_cache_use_is_monotone_in_rho2(seed, r_lo, r_hi, rho1):
    r_lo, r_hi = sorted((r_lo, r_hi))
    groups, _ = _groups(seed % 7)
    scores = _random_scores(groups, seed)
    params = sum(g.dense_params for g in groups)
    used = []
    for rho2 in (r_lo, r_hi):
        kept = importance_ranks(groups, scores, rho1, rho2=rho2, cache_dense=CACHE_DENSE)
        assert _cache_use(groups, kept) <= rho2 * CACHE_DENSE + 1e-9  # the cache budget
        assert sum(g.cost * len(kept[g.key]) for g in groups) <= (rho1 or 1.0) * params + 1e-9  # and the parameters
        assert all(len(kept[g.key]) >= 1 for g in groups)
        used.append(_cache_use(groups, kept))
    assert used[0] <= used[1]


def test_cache_budget_alone_keeps_the_best_cache_components_and_queries_up_to_dense_parameters():
    groups, _ = _groups(3)
    scores = _random_scores(groups, 3)
    kept = importance_ranks(groups, scores, None, rho2=0.5, cache_dense=CACHE_DENSE)
    assert _cache_use(groups, kept) == 4  # 0.5 * 8: the budget is used up exactly (the parameter budget is loose)
    for g in groups:
        if cache_cost(g):  # k and v: the best-scored components of all k/v heads together
            pool = sorted(((float(scores[h.key][i]), h.key, i) for h in groups if cache_cost(h)
                           for i in range(len(h.sigma))), reverse=True)
            best = {(k, i) for _, k, i in pool[:4]}
            assert {(g.key, int(i)) for i in kept[g.key]} == {(k, i) for k, i in best if k == g.key}
    assert achieved_rho1(groups, kept) <= 1.0


def test_rho2_that_no_allocation_meets_is_one_error():
    groups, _ = _groups(4)
    with pytest.raises(WsvdError, match=r"rho2 0.2 is below the minimum of 1 component\(s\) per key/value head "
                                        r"\(rho2 0.2500"):
        importance_ranks(groups, _random_scores(groups, 4), None, rho2=0.2, cache_dense=CACHE_DENSE)
    with pytest.raises(WsvdError, match="below the minimum"):
        uniform_ranks(groups, 0.5, rho2=0.2)
    with pytest.raises(WsvdError, match=r"rho2 1.5 is outside \(0, 1\]"):
        importance_ranks(groups, _random_scores(groups, 4), None, rho2=1.5, cache_dense=CACHE_DENSE)


@given(rho2=st.floats(0.25, 1.0), rho1=st.floats(0.3, 1.0))
def test_uniform_ranks_under_a_cache_budget(rho2, rho1):
    groups, _ = _groups(5)
    kept = uniform_ranks(groups, rho1, rho2=rho2)
    without = uniform_ranks(groups, rho1)
    for g in groups:
        expected = min(len(without[g.key]), int(rho2 * g.shape[0] + 1e-9)) if cache_cost(g) else len(without[g.key])
        assert len(kept[g.key]) == max(1, expected)


def test_table_at_equal_cache_ratio_and_a_cache_budget_too_small(tmp_path, capsys):
    from wsvd_passes.cli import main

    out = tmp_path / "t.json"
    common = ["--model", "tiny-llama-gqa", "--calib-windows", "4", "--seq-len", "32", "--quiet"]
    assert main(["table", *common, "--recipes", "svd-llm,qsvd-noq,wsvd-noq", "--rho2", "0.5", "--eval-windows", "2",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())[1:]
    assert [r["recipe"] for r in rows] == ["svd-llm", "qsvd-noq", "wsvd-noq"]
    assert all(r["rho2_target"] == 0.5 and r["rho1"] is None and 0.4 < r["rho2"] <= 0.5 for r in rows)
    # 2 layers x (K + V: 2 kv heads x 16) values, bfloat16 (2 bytes) when not quantised
    dense = json.loads(out.read_text())[0]["cache_bytes_per_token"]
    assert dense == 2 * 2 * 2 * 16 * 2 and all(r["cache_bytes_per_token"] == pytest.approx(r["rho2"] * dense) for r in rows)
    capsys.readouterr()
    # tiny-llama-gqa: 2 kv heads of dim 16, so one component per k and v head is rho2 1/16 at the least
    assert main(["compress", *common, "--recipe", "wsvd-noq", "--rho2", "0.05", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "rho2 0.05 is below the minimum" in err and err.count("\n") == 1


def test_cache_bytes_of_quantised_latents_count_int8_codes_and_scales():
    from types import SimpleNamespace

    from wsvd_passes.algorithms.quantize import parse_bits
    from wsvd_passes.compression.compress import cache_bytes_per_token
    from wsvd_passes.compression.recipes import RECIPES

    sites = [SimpleNamespace(layer=i, n_kv_heads=2, head_dim=16) for i in range(2)]
    report = SimpleNamespace(ranks={0: {"q": [3, 3], "k": [4, 5], "v": [6, 7]}, 1: {"q": [1, 1], "k": [1, 2], "v": [3, 4]}})
    widths = 4 + 5 + 6 + 7 + 1 + 2 + 3 + 4
    assert cache_bytes_per_token(sites, report, RECIPES["wsvd"], parse_bits("w8a8")) == widths + 2 * (2 * 2) * 4
    assert cache_bytes_per_token(sites, report, RECIPES["wsvd"], parse_bits("w4a4")) == widths + 2 * (2 * 2) * 4
    assert cache_bytes_per_token(sites, report, RECIPES["wsvd-noq"], parse_bits("w16a16")) == 2 * widths
    joint = SimpleNamespace(ranks={i: {"qkv": [10], "q": [10], "k": [10], "v": [10]} for i in range(2)})
    assert cache_bytes_per_token(sites, joint, RECIPES["qsvd"], parse_bits("w8a8")) == 2 * (10 + 4)
    assert cache_bytes_per_token(sites, None, RECIPES["quarot"], parse_bits("w8a8")) == 2 * 2 * 2 * 16 * 2

"""Rank allocation and importance scores against direct float64 computation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wsvd_passes.calibration import InputStats
from wsvd_passes.errors import WsvdError
from wsvd_passes.finetune import fisher_finetune, fisher_weighted_error
from wsvd_passes.lowrank import make_scaling, split_groups
from wsvd_passes.rank_allocation import (ImportanceAccumulator, above_break_even, achieved_rho1, importance_ranks,
                                         uniform_ranks)


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

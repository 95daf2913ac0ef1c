"""Low-rank compression of Q/K/V, end to end: calibrate, allocate ranks, fine-tune, rewrite.

:class:`Calibration` holds what is measured once on the calibration data (input
statistics, the SVD groups of each (granularity, scaling), per-sample gradient
projections for importance, and the diagonal Fisher); :func:`factor_plan` turns it
into per-layer factors for one recipe and rho1, and :class:`~wsvd_passes.factorize.FactorizeQKV`
applies them to a captured graph. Recipes (:mod:`wsvd_passes.recipes`) name the settings.
"""

from __future__ import annotations

import dataclasses

import torch

from .calibration import SiteStats, collect_gradients, collect_input_stats
from .capture import CapturedGraph
from .errors import WsvdError
from .factorize import LayerFactors, pad_heads
from .finetune import fisher_finetune
from .graph_utils import tensor_attr
from .lowrank import PROJECTIONS, Group, make_scaling, split_groups
from .rank_allocation import ImportanceAccumulator, Kept, full_ranks, above_break_even, achieved_rho1, importance_ranks, uniform_ranks
from .recipes import Recipe
from .sites import AttentionSite, find_sites


@dataclasses.dataclass
class Calibration:
    """Measurements shared by every recipe and ratio on one model and calibration set."""

    sites: list[AttentionSite]
    stats: list[SiteStats]
    groups: dict[tuple[str, str], list[Group]]  # (granularity, scaling) -> groups of all layers
    scores: dict[tuple[str, str], dict[tuple, torch.Tensor]]  # importance per component
    fisher: dict[tuple[int, str], torch.Tensor]  # (layer, proj) -> E[g*g] [out, E]
    samples: int


def calibrate(
    captured: CapturedGraph, windows: torch.Tensor, recipes: list[Recipe], *, grad_samples: int | None = None,
    batch_size: int = 8, progress: bool = True,
) -> Calibration:
    """Statistics, SVD groups, importance scores and Fisher for ``recipes`` on ``windows`` [n, S]."""
    if len(windows) < 2:
        raise WsvdError(f"{len(windows)} calibration window(s) are too few: give at least 2 (the paper uses 256)")
    sites = find_sites(captured.gm)
    stats = collect_input_stats(captured, windows.split(batch_size), progress=progress)
    weights = {s.layer: {p: tensor_attr(captured.gm, getattr(s, f"{p}_proj").weight).detach() for p in PROJECTIONS}
               for s in sites}
    groups = {}
    for r in (r for r in recipes if r.factor):
        key = (r.granularity, r.scaling)
        if key not in groups:
            groups[key] = [g for s in sites for g in split_groups(
                s.layer, weights[s.layer],
                make_scaling(stats[s.layer].qkv, r.scaling, s.hidden_size, alpha=r.alpha, where=f"layer {s.layer}"),
                r.granularity, s.head_dim)]
    accumulators = {key: ImportanceAccumulator(groups[key], sites[0].head_dim)
                    for key in {(r.granularity, r.scaling) for r in recipes if r.factor and r.allocation == "importance"}}
    fisher, n = {}, 0
    if accumulators or any(r.factor and r.finetune for r in recipes):
        targets = {getattr(s, f"{p}_proj").weight: (s.layer, p) for s in sites for p in PROJECTIONS}
        samples = windows if grad_samples is None else windows[:grad_samples]

        def on_sample(grads):
            by_proj = {targets[t]: g for t, g in grads.items()}
            for acc in accumulators.values():
                acc(by_proj)

        raw = collect_gradients(captured, list(samples), list(targets), on_sample=on_sample, progress=progress)
        fisher = {targets[t]: f for t, f in raw.items()}
        n = len(samples)
    scores = {key: acc.scores() for key, acc in accumulators.items()}
    return Calibration(sites, stats, groups, scores, fisher, n)


@dataclasses.dataclass
class FactorReport:
    """Achieved ratios and ranks of one compression."""

    rho1: float
    rho2: float
    ranks: dict[int, dict[str, list[int]]]  # layer -> proj -> ranks
    rho1_per_layer: list[float]
    rho2_per_layer: list[float]
    above_break_even: list[tuple]
    finetune: dict | None

    def as_dict(self) -> dict:
        return {"rho1": self.rho1, "rho2": self.rho2, "rho1_per_layer": self.rho1_per_layer,
                "rho2_per_layer": self.rho2_per_layer,
                "ranks": {str(k): v for k, v in self.ranks.items()},
                "above_break_even": [list(k) for k in self.above_break_even], "finetune": self.finetune}


def factor_plan(calib: Calibration, recipe: Recipe, rho1: float | None) -> tuple[dict[int, LayerFactors], FactorReport]:
    """Per-layer factors for ``recipe`` at parameter ratio ``rho1`` (None: full rank, exact)."""
    key = (recipe.granularity, recipe.scaling)
    if key not in calib.groups:
        raise WsvdError(f"recipe {recipe.name} was not part of this calibration: pass it to calibrate()")
    groups = calib.groups[key]
    if rho1 is None:
        kept = full_ranks(groups)
    elif recipe.allocation == "importance":
        kept = importance_ranks(groups, calib.scores[key], rho1)
    else:
        kept = uniform_ranks(groups, rho1)
    plan, ranks, ft = {}, {}, {"loss_before": 0.0, "loss_after": 0.0} if recipe.finetune else None
    for site in calib.sites:
        layer_groups = [g for g in groups if g.layer == site.layer]
        plan[site.layer], ranks[site.layer] = _layer_factors(site, layer_groups, kept, recipe, calib, ft)
    rho2 = [_cache_width(site, ranks[site.layer], recipe.granularity) / (2 * site.n_kv_heads * site.head_dim)
            for site in calib.sites]
    rho1_layers = [achieved_rho1([g for g in groups if g.layer == s.layer], kept) for s in calib.sites]
    report = FactorReport(achieved_rho1(groups, kept), sum(rho2) / len(rho2), ranks, rho1_layers, rho2,
                          above_break_even(groups, kept), ft)
    return plan, report


def _cache_width(site: AttentionSite, ranks: dict[str, list[int]], granularity: str) -> int:
    """Latent values cached per token (the joint latent is shared by K and V)."""
    return sum(ranks["qkv"]) if granularity == "joint" else sum(ranks["k"]) + sum(ranks["v"])


def _layer_factors(site, groups: list[Group], kept: Kept, recipe: Recipe, calib: Calibration, ft: dict | None):
    beta = recipe.beta
    if recipe.granularity == "joint":
        (g,) = groups
        up, down = g.factors(kept[g.key], beta)
        sizes = [site.n_heads * site.head_dim, site.n_kv_heads * site.head_dim, site.n_kv_heads * site.head_dim]
        ups = dict(zip(PROJECTIONS, up.split(sizes)))
        r = len(kept[g.key])
        return (LayerFactors("joint", {"qkv": down}, ups, {p: "qkv" for p in PROJECTIONS}, {p: [r] for p in PROJECTIONS}),
                {"qkv": [r], **{p: [r] for p in PROJECTIONS}})
    downs, ups, ranks = {}, {}, {}
    for p in PROJECTIONS:
        pg = [g for g in groups if g.name == p]
        factors = [g.factors(kept[g.key], beta) for g in pg]
        if recipe.finetune:
            factors = _finetune(pg, factors, calib.fisher[(site.layer, p)], site.head_dim, recipe, ft)
        if recipe.granularity == "head":
            downs[p], ups[p] = pad_heads([u for u, _ in factors], [d for _, d in factors])
        else:
            ((ups[p], downs[p]),) = factors
        ranks[p] = [len(kept[g.key]) for g in pg]
    return LayerFactors(recipe.granularity, downs, ups, {p: p for p in PROJECTIONS}, ranks), ranks


def _finetune(groups: list[Group], factors, fisher: torch.Tensor, head_dim: int, recipe: Recipe, ft: dict):
    """Fisher-weighted fine-tuning of one projection's groups, batched with padded ranks."""
    r_max = max(max(u.shape[1] for u, _ in factors), 1)
    up = torch.stack([torch.nn.functional.pad(u, (0, r_max - u.shape[1])) for u, _ in factors])
    down = torch.stack([torch.nn.functional.pad(d, (0, 0, 0, r_max - d.shape[0])) for _, d in factors])
    W = torch.stack([g.weight for g in groups])
    F = fisher.reshape(len(groups), -1, fisher.shape[-1]) if groups[0].head is not None else fisher[None]
    up, down, losses = fisher_finetune(W, F, up, down, steps=recipe.finetune_steps, lr=recipe.finetune_lr)
    ft["loss_before"] += losses["loss_before"]
    ft["loss_after"] += losses["loss_after"]
    return [(up[i, :, : u.shape[1]].double(), down[i, : d.shape[0]].double()) for i, (u, d) in enumerate(factors)]

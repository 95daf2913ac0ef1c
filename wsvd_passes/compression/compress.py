"""Low-rank compression of Q/K/V, end to end: calibrate, allocate ranks, fine-tune, rewrite.

:class:`Calibration` holds what is measured once on the calibration data (input
statistics, the SVD groups of each (granularity, scaling), per-sample gradient
projections for importance, and the diagonal Fisher); :func:`factor_plan` turns it
into per-layer factors for one recipe and rho1, and :class:`~wsvd_passes.passes.factorize.FactorizeQKV`
applies them to a captured graph. Recipes (:mod:`wsvd_passes.compression.recipes`) name the settings.
"""

from __future__ import annotations

import dataclasses

import torch

from ..algorithms.finetune import fisher_finetune
from ..algorithms.lowrank import PROJECTIONS, Group, make_scaling, split_groups
from ..algorithms.quantize import Bits
from ..algorithms.rank_allocation import (
    ImportanceAccumulator,
    Kept,
    above_break_even,
    achieved_rho1,
    full_ranks,
    importance_ranks,
    uniform_ranks,
)
from ..errors import WsvdError
from ..eval.evaluation import evaluate
from ..graph.capture import CapturedGraph
from ..graph.factor_spec import pad_rank
from ..graph.graph_utils import tensor_attr
from ..graph.pipeline import GraphPass, Pipeline
from ..graph.sites import AttentionSite, find_sites
from ..passes.factorize import FactorizeQKV, LayerFactors, pad_heads
from ..passes.fake_quant import FakeQuantize
from ..passes.heal import Heal, LayerOutputError, LogitKL
from ..passes.qat import LocalQAT, QATTarget, RotatedTargets
from ..passes.rotate import qkv_bases, rotation_passes
from .calibration import SiteStats, as_batches, collect_gradients, collect_input_stats
from .memory import release_memory
from .recipes import Recipe


@dataclasses.dataclass
class Calibration:
    """Measurements shared by every recipe and ratio on one model and calibration set."""

    sites: list[AttentionSite]
    stats: list[SiteStats | None]  # None: no statistics (recipes without scaling only)
    weights: dict[int, dict[str, torch.Tensor]]  # layer -> proj -> dense weight [out, E] (the graph's, not copies)
    # (granularity, scaling) -> groups of all layers, shapes and spectra only (Group.shapes_only): what rank allocation
    # and the report read; factor_plan makes one layer's float64 matrices again at a time (the same bits)
    groups: dict[tuple[str, str], list[Group]]
    scores: dict[tuple[str, str], dict[tuple, torch.Tensor]]  # importance per component
    fisher: dict[tuple[int, str], torch.Tensor]  # (layer, proj) -> E[g*g] [out, E]
    samples: int
    qat_targets: dict[tuple[int, str], QATTarget] | None = None  # rotated dense W' and F' (recipes with QAT)
    windows: torch.Tensor | list | None = None  # the calibration data itself (for tune_beta)
    heal_windows: torch.Tensor | None = None  # what end-to-end healing trains on (None: ``windows``)

    def release(self) -> None:
        """Drop every measurement (one-shot compression, once its passes hold what they still read)."""
        self.stats, self.weights, self.groups, self.scores, self.fisher = [], {}, {}, {}, {}
        self.qat_targets = self.windows = self.heal_windows = None


def calibrate(
    captured: CapturedGraph, windows: torch.Tensor, recipes: list[Recipe], *, grad_samples: int | None = None,
    batch_size: int = 8, progress: bool = True,
) -> Calibration:
    """Statistics, SVD groups, importance scores and Fisher for ``recipes`` on ``windows`` [n, S]."""
    if len(windows) < 2:
        raise WsvdError(f"{len(windows)} calibration window(s) are too few: give at least 2 (the paper uses 256)")
    sites = find_sites(captured.gm)
    stats = collect_input_stats(captured, as_batches(windows, batch_size), progress=progress)
    release_memory()  # the batches' activations and logits
    weights = {s.layer: {p: tensor_attr(captured.gm, getattr(s, f"{p}_proj").weight).detach() for p in PROJECTIONS}
               for s in sites}
    # the float64 groups (whitening factors and SVDs, 0.3 GB on SmolLM2-135M) are made one layer at a time: the
    # accumulators keep the float32 directions they read, the calibration the shapes and spectra
    importance = {(r.granularity, r.scaling) for r in recipes if r.factor and r.allocation == "importance"}
    accumulators: dict[tuple[str, str], list[ImportanceAccumulator]] = {}  # one per layer
    groups: dict[tuple[str, str], list[Group]] = {}
    for s in sites:
        for key, layer in layer_groups(s, weights[s.layer], stats[s.layer], recipes).items():
            if key in importance:
                accumulators.setdefault(key, []).append(ImportanceAccumulator(layer, s.head_dim))
            groups.setdefault(key, []).extend(g.shapes_only() for g in layer)
    release_memory()
    fisher, n, qat_targets = {}, 0, None
    samples = list(windows if grad_samples is None else windows[:grad_samples])
    rotated = RotatedTargets(qkv_bases(captured.gm, sites)) if any(r.qat for r in recipes) else None
    if accumulators or rotated is not None or any(r.factor and r.finetune for r in recipes):
        targets = {getattr(s, f"{p}_proj").weight: (s.layer, p) for s in sites for p in PROJECTIONS}

        def on_sample(grads):
            by_proj = {targets[t]: g for t, g in grads.items()}
            for layers in accumulators.values():
                for acc in layers:
                    acc(by_proj)
            if rotated is not None:
                rotated(by_proj)

        raw = collect_gradients(captured, samples, list(targets), on_sample=on_sample, progress=progress)
        fisher = {targets[t]: f for t, f in raw.items()}
        n = len(samples)
        if rotated is not None:
            qat_targets = rotated.targets({(s.layer, p): weights[s.layer][p] for s in sites for p in PROJECTIONS})
        del rotated
        release_memory()
    scores = {key: {k: v for acc in layers for k, v in acc.scores().items()} for key, layers in accumulators.items()}
    return Calibration(sites, stats, weights, groups, scores, fisher, n, qat_targets, windows)


def layer_groups(site: AttentionSite, weights: dict[str, torch.Tensor], stats: SiteStats | None, recipes: list[Recipe]
                 ) -> dict[tuple[str, str], list[Group]]:
    """The SVD groups of one layer's q/k/v ``weights`` for every (granularity, scaling) of ``recipes`` (deterministic:
    made again from the same inputs, the same bits)."""
    groups = {}
    for r in (r for r in recipes if r.factor):
        key = (r.granularity, r.scaling)
        if key not in groups:
            scaling = make_scaling(stats.qkv if stats else None, r.scaling, site.hidden_size, alpha=r.alpha,
                                   where=f"layer {site.layer}", device=weights["q"].device)
            groups[key] = split_groups(site.layer, weights, scaling, r.granularity, site.head_dim)
    return groups


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
    reconstruction: dict[int, dict[str, dict[str, float]]]  # layer -> proj -> {"before_ft", "after"}
    spectra: dict[str, torch.Tensor]  # "layer{L}.{proj}[.head{h}].before|after" -> singular values
    qat: dict | None = None  # LocalQAT.report when the recipe trains S2
    heal: dict | None = None  # Heal.report when the recipe heals its factors end to end
    rho2_target: float | None = None  # the cache budget the ranks were allocated under (None: rho1 only)

    def as_dict(self) -> dict:
        """Everything but the spectra (tensors), JSON-ready."""
        return {"rho1": self.rho1, "rho2": self.rho2, "rho2_target": self.rho2_target, "rho1_per_layer": self.rho1_per_layer,
                "rho2_per_layer": self.rho2_per_layer,
                "ranks": {str(k): v for k, v in self.ranks.items()},
                "above_break_even": [list(k) for k in self.above_break_even], "finetune": self.finetune,
                "reconstruction": {str(k): v for k, v in self.reconstruction.items()}, "qat": self.qat,
                "heal": self.heal}


def allocate_ranks(groups: list[Group], scores: dict[tuple, torch.Tensor] | None, recipe: Recipe, rho1: float | None,
                   rho2: float | None = None, cache_dense: int | None = None) -> Kept:
    """The kept components of every group for ``recipe`` at parameter ratio ``rho1`` and/or cache ratio ``rho2``
    (both None: all; rho2 alone: rho1 = 1), allocated over all ``groups``; ``cache_dense`` is the dense K+V cache
    width summed over the layers (needed with ``rho2``)."""
    if rho1 is None and rho2 is None:
        return full_ranks(groups)
    if recipe.allocation == "importance":
        return importance_ranks(groups, scores, rho1, rho2=rho2, cache_dense=cache_dense)
    return uniform_ranks(groups, rho1, rho2=rho2)


def factor_plan(calib: Calibration, recipe: Recipe, rho1: float | None, rho2: float | None = None, *,
                kept: Kept | None = None) -> tuple[dict[int, LayerFactors], FactorReport]:
    """Per-layer factors for ``recipe`` at parameter ratio ``rho1`` and/or cache ratio ``rho2`` (both None: full
    rank, exact); ``kept`` gives ranks allocated beforehand over more groups than ``calib`` holds (streamed
    compression). Ranks are allocated on the calibration's shapes and spectra; each layer's float64 groups (whitening
    factors and SVDs) are made again from its weights and statistics when its factors are made, and freed after."""
    key = (recipe.granularity, recipe.scaling)
    if key not in calib.groups:
        raise WsvdError(f"recipe {recipe.name} was not part of this calibration: pass it to calibrate()")
    groups = calib.groups[key]
    if kept is None:
        cache_dense = sum(2 * s.n_kv_heads * s.head_dim for s in calib.sites)
        kept = allocate_ranks(groups, calib.scores.get(key), recipe, rho1, rho2, cache_dense)
    plan, ranks, ft = {}, {}, {"loss_before": 0.0, "loss_after": 0.0} if recipe.finetune else None
    analysis = _Analysis()
    for i, site in enumerate(calib.sites):
        layer = layer_groups(site, calib.weights[site.layer], calib.stats[i] if calib.stats else None, [recipe])[key]
        plan[site.layer], ranks[site.layer] = _layer_factors(site, layer, kept, recipe, calib, ft, analysis)
    rho2_layers = [_cache_width(site, ranks[site.layer], recipe.granularity) / (2 * site.n_kv_heads * site.head_dim)
                   for site in calib.sites]
    rho1_layers = [achieved_rho1([g for g in groups if g.layer == s.layer], kept) for s in calib.sites]
    report = FactorReport(achieved_rho1(groups, kept), sum(rho2_layers) / len(rho2_layers), ranks, rho1_layers,
                          rho2_layers, above_break_even(groups, kept), ft, analysis.relative_errors(), analysis.spectra,
                          rho2_target=rho2)
    return plan, report


class _Analysis:
    """Reconstruction error and spectra of each group, in its scaled coordinates (W' = W S).

    Relative error per (layer, projection): ``||(W - up down) S||_F / ||W S||_F`` over its groups,
    for the truncated SVD (before fine-tuning) and the final factors.
    """

    def __init__(self):
        self.sums: dict[tuple[int, str], list[float]] = {}
        self.spectra: dict[str, torch.Tensor] = {}

    def add(self, g: Group, truncated: tuple[torch.Tensor, torch.Tensor], final: tuple[torch.Tensor, torch.Tensor]):
        S = g.scaling.S
        sums = self.sums.setdefault((g.layer, g.name), [0.0, 0.0, 0.0])
        for i, (up, down) in enumerate((truncated, final)):
            sums[i] += float(((g.weight - up.double() @ down.double()) @ S).square().sum())
        sums[2] += float(g.sigma.square().sum())
        name = f"layer{g.layer}.{g.name}" + (f".head{g.head}" if g.head is not None else "")
        self.spectra[f"{name}.before"] = g.sigma.float().cpu()
        # the r singular values of up down S, from r x r triangles: up = Q1 R1, (down S)^T = Q2 R2 give
        # up down S = Q1 (R1 R2^T) Q2^T (an SVD of the [out, in] product was 70% of this step)
        r1 = torch.linalg.qr(final[0].double()).R
        r2 = torch.linalg.qr((final[1].double() @ S).T).R
        self.spectra[f"{name}.after"] = torch.linalg.svdvals(r1 @ r2.T).float().cpu()

    def relative_errors(self) -> dict[int, dict[str, dict[str, float]]]:
        out: dict[int, dict[str, dict[str, float]]] = {}
        for (layer, name), (before, after, ref) in self.sums.items():
            ref = max(ref, 1e-300)
            out.setdefault(layer, {})[name] = {"before_ft": (before / ref) ** 0.5, "after": (after / ref) ** 0.5}
        return out


def recipe_passes(recipe: Recipe, bits: Bits, plan: dict[int, LayerFactors] | None = None,
                  qat_targets: dict[tuple[int, str], QATTarget] | None = None, *, replay: bool = False,
                  heal_data: tuple[LogitKL | LayerOutputError, torch.Tensor | list] | None = None,
                  progress: bool = False) -> list[GraphPass]:
    """The passes of ``recipe`` in order: factorise, rotate (S1, V heads, online Hadamard),
    local QAT (S2), fake-quantise, heal end to end.

    ``replay=True`` rebuilds only the graph structure, for tensors loaded afterwards
    (:func:`wsvd_passes.artifacts.artifact.load`): QAT takes no steps, the clip search is skipped and healing
    (which changes tensors only) is left out. Healing needs ``heal_data`` = (its objective, its samples): (``LogitKL``
    of the uncompressed capture, the calibration windows) for the whole graph.
    """
    passes = []
    if recipe.factor:
        if plan is None:
            raise WsvdError(f"recipe {recipe.name} factorises: give its plan (factor_plan)")
        passes.append(FactorizeQKV(plan))
    if recipe.rotate:
        passes += rotation_passes()
    if recipe.qat:
        if not (recipe.rotate and recipe.quantize and recipe.granularity == "head"):
            raise WsvdError(f"recipe {recipe.name}: local QAT needs rotate=True, quantize=True and granularity 'head'")
        if qat_targets is None:
            raise WsvdError(f"recipe {recipe.name} trains S2: calibrate with it so that its QAT targets are measured")
        passes.append(LocalQAT(qat_targets, bits.weight, steps=0 if replay else recipe.qat_steps, lr=recipe.qat_lr,
                               s2_lr=recipe.qat_s2_lr, progress=progress))
    if recipe.quantize:
        passes.append(FakeQuantize(bits, clip_search=not replay, progress=progress))
    if recipe.heal_steps and not replay:
        if not recipe.factor:
            raise WsvdError(f"recipe {recipe.name} has no low-rank factors to heal: use a factor recipe such as wsvd-heal")
        if heal_data is None:
            raise WsvdError(f"recipe {recipe.name} heals its factors: give its objective and calibration samples")
        objective, windows = heal_data
        passes.append(Heal(objective, windows, steps=recipe.heal_steps, lr=recipe.heal_lr, batch_size=recipe.heal_batch,
                           weight_bits=bits.weight if recipe.quantize else 16, s2=recipe.qat, s2_lr=recipe.qat_s2_lr,
                           progress=progress))
    return passes


def compress(captured: CapturedGraph, calib: Calibration | None, recipe: Recipe, rho1: float | None, bits: Bits, *,
             rho2: float | None = None, progress: bool = False, in_place: bool = False
             ) -> tuple[CapturedGraph, FactorReport | None]:
    """A compressed copy of ``captured`` (the original is left untouched) and its factor report.

    ``in_place`` compresses ``captured`` itself and uses ``calib`` up (one-shot runs such as ``wsvd compress``): the
    calibration is emptied once the factors are planned and the passes built, and each pass is dropped once it has
    run, so every dense tensor, measurement, factor and QAT target is freed when nothing reads it any more (provided
    the caller holds none, e.g. the eager model the capture shares its weights with). Healing compares with the
    uncompressed graph, so it needs a copy.
    """
    if in_place and recipe.heal_steps:
        raise WsvdError(f"recipe {recipe.name} heals against the uncompressed graph: compress a copy (in_place=False)")
    plan, report = factor_plan(calib, recipe, rho1, rho2) if recipe.factor else (None, None)
    passes = recipe_passes(recipe, bits, plan, calib.qat_targets if calib else None, progress=progress,
                           heal_data=(LogitKL(captured), _heal_windows(calib)) if calib else None)
    del plan  # held by FactorizeQKV until it has run
    for p in passes:  # their reports are filled in as they run
        if isinstance(p, LocalQAT):
            report.qat = p.report
        elif isinstance(p, Heal):
            report.heal = p.report
    if in_place:
        if calib is not None:
            calib.release()
        release_memory()
    compressed = captured if in_place else captured.sharing_parameters()
    while passes:
        Pipeline([passes.pop(0)])(compressed)
    return compressed, report


def _heal_windows(calib: Calibration) -> torch.Tensor | list:
    return calib.windows if calib.heal_windows is None else calib.heal_windows


BETA_GRID = (0.25, 0.5, 0.75)


def tune_beta(captured: CapturedGraph, calib: Calibration, recipe: Recipe, rho1: float | None, bits: Bits, *,
              rho2: float | None = None, windows: int = 8, grid: tuple[float, ...] = BETA_GRID
              ) -> tuple[Recipe, dict[float, float]]:
    """QSVD's beta: the split of Sigma between down (Sigma^beta) and up (Sigma^(1-beta)) that minimises
    the next-token loss of the compressed (quantised) model on the first ``windows`` calibration
    windows (never evaluation data). Returns the recipe with that beta and the loss per beta.
    """
    data = calib.windows[:windows]
    losses = {}
    for beta in grid:
        candidate = dataclasses.replace(recipe, beta=beta)
        compressed, _ = compress(captured, calib, candidate, rho1, bits, rho2=rho2)
        losses[beta] = evaluate(lambda ids: compressed.gm(input_ids=ids), data, progress=False,
                                device=captured.device).nll
    best = min(grid, key=losses.__getitem__)  # ties keep the earlier grid value
    return dataclasses.replace(recipe, beta=best), losses


def cache_bytes_per_token(sites: list[AttentionSite], report: FactorReport | None, recipe: Recipe, bits: Bits) -> float:
    """K+V cache bytes per token over all layers as deployed, before padding: latents (unpadded ranks) as int8
    codes plus one float32 scale per latent block (kv head, projection or joint latent) when activations are
    quantised to <= 8 bits, else bfloat16 values; recipes without factors cache dense K and V in bfloat16."""
    if report is None:
        return float(sum(2 * s.n_kv_heads * s.head_dim * 2 for s in sites))
    blocks = {"head": lambda s: 2 * s.n_kv_heads, "projection": lambda s: 2, "joint": lambda s: 1}[recipe.granularity]
    total = 0.0
    for site in sites:
        width = _cache_width(site, report.ranks[site.layer], recipe.granularity)
        total += width + 4 * blocks(site) if recipe.quantize and bits.activation <= 8 else 2 * width
    return total


def _cache_width(site: AttentionSite, ranks: dict[str, list[int]], granularity: str) -> int:
    """Latent values cached per token (the joint latent is shared by K and V)."""
    return sum(ranks["qkv"]) if granularity == "joint" else sum(ranks["k"]) + sum(ranks["v"])


def _layer_factors(site, groups: list[Group], kept: Kept, recipe: Recipe, calib: Calibration, ft: dict | None,
                   analysis: _Analysis):
    beta = recipe.beta
    if recipe.granularity == "joint":
        (g,) = groups
        up, down = g.factors(kept[g.key], beta)
        analysis.add(g, (up, down), (up, down))
        sizes = [site.n_heads * site.head_dim, site.n_kv_heads * site.head_dim, site.n_kv_heads * site.head_dim]
        ups = dict(zip(PROJECTIONS, up.split(sizes)))
        r = len(kept[g.key])
        return (LayerFactors("joint", {"qkv": down}, ups, {p: "qkv" for p in PROJECTIONS}, {p: [r] for p in PROJECTIONS}),
                {"qkv": [r], **{p: [r] for p in PROJECTIONS}})
    downs, ups, ranks = {}, {}, {}
    for p in PROJECTIONS:
        pg = [g for g in groups if g.name == p]
        truncated = [g.factors(kept[g.key], beta) for g in pg]
        factors = truncated
        if recipe.finetune:
            factors = _finetune(pg, truncated, calib.fisher[(site.layer, p)], site.head_dim, recipe, ft)
        for g, t, f in zip(pg, truncated, factors):
            analysis.add(g, t, f)
        if recipe.granularity == "head":
            downs[p], ups[p] = pad_heads([u for u, _ in factors], [d for _, d in factors])
        else:
            ((ups[p], downs[p]),) = factors
        ranks[p] = [len(kept[g.key]) for g in pg]
    return LayerFactors(recipe.granularity, downs, ups, {p: p for p in PROJECTIONS}, ranks), ranks


def _finetune(groups: list[Group], factors, fisher: torch.Tensor, head_dim: int, recipe: Recipe, ft: dict):
    """Fisher-weighted fine-tuning of one projection's groups, batched with padded ranks."""
    r_max = max(max(u.shape[1] for u, _ in factors), 1)
    up, down = (torch.stack(t) for t in zip(*(pad_rank(u, d, r_max) for u, d in factors)))
    W = torch.stack([g.weight for g in groups])
    F = fisher.reshape(len(groups), -1, fisher.shape[-1]) if groups[0].head is not None else fisher[None]
    up, down, losses = fisher_finetune(W, F, up, down, steps=recipe.finetune_steps, lr=recipe.finetune_lr)
    ft["loss_before"] += losses["loss_before"]
    ft["loss_after"] += losses["loss_after"]
    return [(up[i, :, : u.shape[1]].double(), down[i, : d.shape[0]].double()) for i, (u, d) in enumerate(factors)]

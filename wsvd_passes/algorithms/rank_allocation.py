"""Rank allocation: which singular components of which groups to keep under a rho1 budget,
a rho2 (KV-cache) budget, or both.

Parameter budget: ``rho1 * sum_groups E * m`` parameters; a kept component of a group costs
``E + m`` (its column of ``up`` and row of ``down``).
Cache budget: ``rho2 * sum_layers 2 n_kv H`` cached values per token; a kept component of a key or
value group (per head or per projection) or of a joint group costs one (its latent channel), a
query component none. With rho2 alone the parameter budget is rho1 = 1 (never more parameters than
the dense projections).

- :func:`uniform_ranks`: every group keeps its leading ``floor(rho1 * E m / (E + m))``
  components (the same ratio everywhere; achieved rho1 <= target), key/value groups at most
  ``floor(rho2 * m)`` (achieved rho2 <= target).
- :func:`importance_ranks`: global greedy by importance (QSVD/WSVD): components in score order,
  each kept when it fits every budget. The score of
  component i of a group is ``sigma_i * sqrt(mean_samples g_i^2)`` with
  ``g_i = u_i^T (dL/dW') v_i`` the per-sample gradient in scaled coordinates
  (``dL/dW' = dL/dW S^-T``), accumulated by :class:`ImportanceAccumulator`.

Choices for the edge cases (documented in the README):
- every group keeps at least ``min_rank`` (default 1) components, its best-scored,
  paid from the budget first: a head with rank 0 would turn its keys or values
  into constants, and nothing downstream expects an empty latent;
- ties in score are broken by group order (layer, projection, head) and then by
  component index, so allocation is deterministic;
- a group may win more components than its break-even rank E m / (E + m): it stays
  factored (the latent cache and the decode kernel need every head factored), pays
  its true cost from the budget, and :func:`above_break_even` reports it.
"""

from __future__ import annotations

import math

import torch

from ..errors import WsvdError
from .lowrank import Group

Kept = dict[tuple, torch.Tensor]  # group key -> sorted int64 indices of kept components


def _check_rho1(rho1: float) -> None:
    if not 0 < rho1 <= 1:
        raise WsvdError(f"rho1 {rho1} is outside (0, 1]: it is the kept fraction of Q/K/V parameters")


def check_rho2(rho2: float) -> None:
    if not 0 < rho2 <= 1:
        raise WsvdError(f"rho2 {rho2} is outside (0, 1]: it is the kept fraction of the K+V cache")


def cache_cost(g: Group) -> int:
    """Cached values per token of one kept component: 1 for key, value and joint groups, 0 for queries."""
    return int(g.name in ("k", "v", "qkv"))


def _rho2_too_low(rho2: float, minimum: float, min_rank: int) -> WsvdError:
    return WsvdError(f"rho2 {rho2} is below the minimum of {min_rank} component(s) per key/value head "
                     f"(rho2 {minimum:.4f} for this model): raise rho2")


def uniform_ranks(groups: list[Group], rho1: float | None, *, rho2: float | None = None, min_rank: int = 1) -> Kept:
    """Leading components of every group at the same ratio (rho1 None: 1; rho2 None: no cache budget)."""
    rho1 = 1.0 if rho1 is None else rho1
    _check_rho1(rho1)
    if rho2 is not None:
        check_rho2(rho2)
        if any(g.name == "qkv" for g in groups):
            raise WsvdError("uniform ranks under a rho2 budget need per-projection or per-head groups, not joint ones")
        cached = [g for g in groups if cache_cost(g)]
        if any(math.floor(rho2 * g.shape[0] + 1e-9) < min_rank for g in cached):
            raise _rho2_too_low(rho2, max(min_rank / g.shape[0] for g in cached), min_rank)
    kept = {}
    for g in groups:
        m, e = g.shape
        r = max(min_rank, math.floor(rho1 * m * e / (m + e) + 1e-9))
        if rho2 is not None and cache_cost(g):
            r = min(r, math.floor(rho2 * m + 1e-9))
        kept[g.key] = torch.arange(min(r, len(g.sigma)))
    return kept


def full_ranks(groups: list[Group]) -> Kept:
    """Every component of every group (an exact factorisation, for checks)."""
    return {g.key: torch.arange(len(g.sigma)) for g in groups}


class ImportanceAccumulator:
    """Accumulates sum over samples of g_i^2 for every component of every group.

    Call it with one sample's gradients ``{(layer, proj): dL/dW_proj [out, E]}``.
    """

    def __init__(self, groups: list[Group], head_dim: int):
        self.keys = [g.key for g in groups]  # not the groups: their float64 matrices need not stay alive
        self.sigmas = [g.sigma for g in groups]
        self.head_dim = head_dim
        # g_i = u_i^T G (S^-T v_i): precompute the right directions S^-T V [E, k] in float32.
        self._right = [(g.scaling.inv.T @ g.Vh.T).float() for g in groups]
        self._left = [g.U.float() for g in groups]
        self.sum_sq = [torch.zeros(len(g.sigma), dtype=torch.float64, device=g.sigma.device) for g in groups]
        self.samples = 0

    def _grad_of(self, key: tuple, grads: dict) -> torch.Tensor:
        layer, name, head = key
        if name == "qkv":
            return torch.cat([grads[(layer, p)] for p in ("q", "k", "v")])
        G = grads[(layer, name)]
        return G if head is None else G[head * self.head_dim : (head + 1) * self.head_dim]

    def __call__(self, grads: dict) -> None:
        for i, key in enumerate(self.keys):
            G = self._grad_of(key, grads).float()
            proj = ((self._left[i].T @ G) * self._right[i].T).sum(-1)
            self.sum_sq[i] += proj.double().square()
        self.samples += 1

    def scores(self) -> dict[tuple, torch.Tensor]:
        if self.samples == 0:
            raise WsvdError("importance scores need per-sample gradients: no calibration sample was seen")
        return {key: sigma * (s / self.samples).sqrt() for key, sigma, s in zip(self.keys, self.sigmas, self.sum_sq)}


def importance_ranks(groups: list[Group], scores: dict[tuple, torch.Tensor], rho1: float | None, *,
                     rho2: float | None = None, cache_dense: int | None = None, min_rank: int = 1) -> Kept:
    """Greedy by ``scores`` under the rho1 parameter budget (None: 1) and, with ``rho2``, the cache budget
    ``rho2 * cache_dense`` (``cache_dense``: the dense K+V cache width summed over the layers)."""
    rho1 = 1.0 if rho1 is None else rho1
    _check_rho1(rho1)
    budget = rho1 * sum(g.dense_params for g in groups)
    cache = math.inf
    if rho2 is not None:
        check_rho2(rho2)
        if not cache_dense:
            raise WsvdError("a rho2 budget needs the dense cache width (cache_dense)")
        cache = rho2 * cache_dense + 1e-9
    chosen: dict[tuple, list[int]] = {g.key: [] for g in groups}
    candidates = []
    for gi, g in enumerate(groups):
        s = scores[g.key].cpu()  # read element by element below
        if not torch.isfinite(s).all():
            raise WsvdError(f"importance scores of group {g.key} are not finite; check the calibration gradients")
        order = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))
        for i in order[:min_rank]:
            chosen[g.key].append(i)
            budget -= g.cost
            cache -= cache_cost(g)
        candidates += [(-float(s[i]), gi, i) for i in order[min_rank:]]
    if budget < 0:
        raise WsvdError(f"rho1 {rho1} is below the minimum of {min_rank} component(s) per group; raise rho1")
    if cache < 0:
        raise _rho2_too_low(rho2, sum(min_rank * cache_cost(g) for g in groups) / cache_dense, min_rank)
    for _, gi, i in sorted(candidates):
        g = groups[gi]
        if g.cost <= budget and cache_cost(g) <= cache:
            chosen[g.key].append(i)
            budget -= g.cost
            cache -= cache_cost(g)
    return {k: torch.tensor(sorted(v), dtype=torch.long) for k, v in chosen.items()}


def above_break_even(groups: list[Group], kept: Kept) -> list[tuple]:
    """Keys of groups whose factored form has more parameters than the dense one."""
    return [g.key for g in groups if g.cost * len(kept[g.key]) > g.dense_params]


def achieved_rho1(groups: list[Group], kept: Kept) -> float:
    return sum(g.cost * len(kept[g.key]) for g in groups) / sum(g.dense_params for g in groups)

"""Low-rank factorisation math: scaling, SVD groups, factors and rank accounting.

A *group* is one matrix factored on its own: W [m, E] with input width E.
Granularities (how Q/K/V weights are cut into groups, per layer):

- ``projection``: W_q, W_k, W_v separately (the ASVD / SVD-LLM baselines);
- ``joint``: [W_q; W_k; W_v] stacked along outputs, one shared latent (QSVD);
- ``head``: each q-head and kv-head slice W_h [H, E] separately (WSVD).

Scaling S [E, E] makes the truncation error match the output error: with W' = W S,
``W ~= trunc(W') S^-1``. ``none``: S = I. ``asvd``: S = diag(mean|x|^alpha).
``whiten`` (SVD-LLM): S = L with L L^T = X^T X / N (Cholesky, float64), so that
``||X (W - W~)^T||_F^2 / N = ||(W' - trunc(W'))||_F^2``.

With W' = U diag(sigma) V^T and a kept index set K (not necessarily a prefix),
``down = diag(sigma_K^beta) V_K^T S^-1`` [|K|, E] and ``up = U_K diag(sigma_K^(1-beta))``
[m, |K|], so ``W~ = up @ down`` and the latent is ``x @ down^T``.

Costs follow the WSVD paper: a kept component of a group costs E + m parameters
against E * m dense ones, so ``rho1 = sum (E + m) r / sum E m`` over all Q/K/V groups.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from ..compression.calibration import InputStats
from ..errors import WsvdError

GRANULARITIES = ("projection", "joint", "head")
SCALINGS = ("none", "asvd", "whiten")
PROJECTIONS = ("q", "k", "v")


@dataclasses.dataclass
class Scaling:
    """W' = W @ S; ``inv`` is S^-1. Both float64 [E, E]."""

    S: torch.Tensor
    inv: torch.Tensor


def make_scaling(stats: InputStats | None, method: str, width: int, *, alpha: float = 0.5, where: str = "",
                 device: torch.device | str = "cpu") -> Scaling:
    """The scaling matrix of one attention input of ``width`` features (see module docstring), on the
    device of ``stats`` (``device`` for ``none``)."""
    if method not in SCALINGS:
        raise WsvdError(f"unknown scaling {method!r}: use one of {', '.join(SCALINGS)}")
    if method == "none":
        eye = torch.eye(width, dtype=torch.float64, device=device)
        return Scaling(eye, eye)
    if stats is None:
        raise WsvdError(f"scaling {method!r} needs calibration statistics: run collect_input_stats first")
    if method == "asvd":
        d = stats.absmean.clamp_min(1e-6 * float(stats.absmean.max())) ** alpha
        return Scaling(torch.diag(d), torch.diag(1.0 / d))
    L = whitening_factor(stats.gram, where=where)
    eye = torch.eye(L.shape[0], dtype=torch.float64, device=L.device)
    return Scaling(L, torch.linalg.solve_triangular(L, eye, upper=False))


def whitening_factor(gram: torch.Tensor, *, where: str = "") -> torch.Tensor:
    """Lower Cholesky factor of the (float64) Gram; adds growing jitter if it is not positive definite."""
    gram = gram.double()
    L, info = torch.linalg.cholesky_ex(gram)
    if info == 0:
        return L
    scale = float(gram.diagonal().mean())
    for exponent in range(-10, 0):
        jitter = scale * 10.0**exponent
        L, info = torch.linalg.cholesky_ex(gram + jitter * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))
        if info == 0:
            warnings.warn(f"{where}: Gram matrix is not positive definite; added jitter {jitter:.3g} to whiten it",
                          stacklevel=2)
            return L
    raise WsvdError(f"{where}: the calibration Gram matrix cannot be whitened even with jitter; use more calibration data")


@dataclasses.dataclass
class Group:
    """One matrix to factor and its SVD in scaled coordinates."""

    layer: int
    name: str  # "q", "k", "v" or "qkv" (joint)
    head: int | None  # head index for the head granularity
    source: torch.Tensor  # [m, E] in the model's dtype, original coordinates (a view of the model's weight)
    scaling: Scaling
    U: torch.Tensor  # [m, k]
    sigma: torch.Tensor  # [k]
    Vh: torch.Tensor  # [k, E]

    @property
    def key(self) -> tuple:
        return (self.layer, self.name, self.head)

    @property
    def weight(self) -> torch.Tensor:
        """float64 [m, E], made on use (30 layers of float64 copies of q/k/v are 133 MB on SmolLM2-135M)."""
        return self.source.double()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.source.shape)

    @property
    def cost(self) -> int:
        """Parameters per kept component: E + m."""
        return sum(self.shape)

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]

    def shapes_only(self) -> Group:
        """This group without its matrices (source, U, Vh on the meta device, no scaling): what rank allocation and the
        factor report read (key, shape, sigma)."""
        meta = {f: torch.empty(getattr(self, f).shape, device="meta") for f in ("source", "U", "Vh")}
        return dataclasses.replace(self, scaling=None, **meta)

    def factors(self, kept: torch.Tensor, beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [m, r], down [r, E]) float64 for kept component indices."""
        s = self.sigma[kept]
        down = (s[:, None] ** beta) * self.Vh[kept] @ self.scaling.inv
        up = self.U[:, kept] * s[None, :] ** (1 - beta)
        return up, down


def svd_group(layer: int, name: str, head: int | None, weight: torch.Tensor, scaling: Scaling) -> Group:
    U, sigma, Vh = torch.linalg.svd(weight.double() @ scaling.S, full_matrices=False)
    return Group(layer, name, head, weight.detach(), scaling, U, sigma, Vh)


def split_groups(layer: int, weights: dict[str, torch.Tensor], scaling: Scaling, granularity: str, head_dim: int) -> list[Group]:
    """Cut one layer's q/k/v weights ({name: [out, E]}) into groups and SVD each."""
    if granularity == "joint":
        stacked = torch.cat([weights[p] for p in PROJECTIONS])
        return [svd_group(layer, "qkv", None, stacked, scaling)]
    if granularity == "projection":
        return [svd_group(layer, p, None, weights[p], scaling) for p in PROJECTIONS]
    if granularity == "head":
        return [svd_group(layer, p, h, w, scaling)
                for p in PROJECTIONS for h, w in enumerate(weights[p].split(head_dim))]
    raise WsvdError(f"unknown granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")

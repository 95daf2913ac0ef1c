"""Learnable latent rotation S2 and Fisher-weighted local QAT (WSVD section 3.3).

For every head h of a per-head factored projection (after :class:`~wsvd_passes.passes.rotate.RotateResidual`
has fused RMSNorm gamma and the Hadamard S1 into the down-projection), with the graph's
convention ``y = x W^T``, up U_h [d, r_h], down D_h [r_h, E] and an orthogonal S2_h [r_h, r_h]:

    U_h D_h = (U_h S2_h^T)(S2_h D_h)             exact: S2 only rotates the latent C_h = x D_h^T
    min_{U, D, S2}  sum_h mean( F'_h * (W'_h - Q(U_h S2_h^T) Q(S2_h D_h))^2 )

W'_h [d, E] is the dense weight in the same rotated basis, F'_h = E[g' * g'] the diagonal
Fisher there (g' = dLoss/dW' of the rotated dense model, the basis the factors live in, mapped
from the dense per-sample gradients by :class:`RotatedTargets`), and Q is the deployment weight quantiser
(:func:`~wsvd_passes.algorithms.quantize.fake_quant_weight`, per output row with the clipping search,
searched again at every step) with straight-through gradients. S2 is a Cayley-parametrised
orthogonal matrix (``torch.nn.utils.parametrizations.orthogonal``) started at an independent
random rotation per head, which also spreads the latent's energy over its channels before
the per-token-per-head activation quantiser; A and B train with Adam (paper: lr 1e-5, 50
steps). On exit S2 is folded into the factors, so the graph shape is unchanged. All heads of
a projection train as one batch; the zero padding of lower-rank heads stays zero.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule
from torch.nn.utils.parametrizations import orthogonal
from tqdm.auto import tqdm

from ..algorithms.finetune import normalized_fisher
from ..algorithms.lowrank import PROJECTIONS
from ..algorithms.quantize import fake_quant_weight, search_weight_clip
from ..errors import WsvdError
from ..graph.factor_spec import factor_spec, from_head_blocks, head_blocks, pad_rank
from ..graph.graph_utils import tensor_attr
from ..graph.pipeline import GraphPass
from ..graph.sites import AttentionSite
from .rotate import QKVBasis, replace_tensor_arg


@dataclasses.dataclass
class QATTarget:
    """Dense weight W' [out, E] and its diagonal Fisher F' [out, E], both in the rotated basis."""

    weight: torch.Tensor
    fisher: torch.Tensor


class RotatedTargets:
    """QAT targets of dense q/k/v in the rotated basis, from per-sample gradients of the unrotated graph:
    W'_p = basis.weight(W_p) and F'_p = E_samples[g'_p * g'_p] with g'_p = basis.gradient(g_p)
    (:class:`~wsvd_passes.passes.rotate.QKVBasis`), so neither a rotated copy of the model nor a second
    backward pass is needed. Called once per sample with that sample's ``{(layer, proj): g [out, E]}``."""

    def __init__(self, bases: dict[int, QKVBasis]):
        self.bases = bases
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.samples = 0

    def __call__(self, grads: dict[tuple[int, str], torch.Tensor]) -> None:
        for (layer, p), g in grads.items():
            square = self.bases[layer].gradient(p, g.detach().float()).square()
            if (layer, p) in self.sums:
                self.sums[(layer, p)] += square
            else:
                self.sums[(layer, p)] = square
        self.samples += 1

    def targets(self, weights: dict[tuple[int, str], torch.Tensor]) -> dict[tuple[int, str], QATTarget]:
        """``(layer, proj) -> QATTarget`` for the dense ``weights`` {(layer, proj): W [out, E]} seen by the calls."""
        if self.samples == 0:
            raise WsvdError("no calibration samples were given for the QAT targets")
        return {key: QATTarget(self.bases[key[0]].weight(key[1], weights[key].detach().double()).float(),
                               self.sums[key] / self.samples)
                for key in self.sums}


def quantized_product(up: torch.Tensor, down: torch.Tensor, bits: int, clips=None) -> torch.Tensor:
    """Q(U) Q(D) for batches U [n, d, r], D [n, r, E], per output row, straight-through gradients.

    ``clips`` = (clip of U's rows, clip of D's rows) from :func:`search_clips`; None searches now.
    """
    if bits >= 16:
        return up @ down
    clips = clips or search_clips(up, down, bits)
    return _quantize_rows(up, bits, clips[0]) @ _quantize_rows(down, bits, clips[1])


def search_clips(up: torch.Tensor, down: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The deployment clipping search (:func:`~wsvd_passes.algorithms.quantize.search_weight_clip`) on every row."""
    return tuple(search_weight_clip(w.detach().reshape(-1, w.shape[-1]), bits) for w in (up, down))


def _quantize_rows(w: torch.Tensor, bits: int, clip: torch.Tensor) -> torch.Tensor:
    flat = w.reshape(-1, w.shape[-1])
    return fake_quant_weight(flat, bits, clip_ratio=clip, ste=True).reshape(w.shape)


def random_rotations(n: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """n independent Haar-random orthogonal r x r matrices [n, r, r] (QR with the sign fix)."""
    q, R = torch.linalg.qr(torch.randn(n, r, r, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)


class Rotation(torch.nn.Module):
    """A batch of orthogonal matrices [n, r, r], ``start @ cayley(K)`` with K skew-symmetric.

    For a head of rank r_h < r the gradient of K is masked to its top-left r_h x r_h block, so
    K stays zero elsewhere and S2 = blockdiag(S2_h, I) when ``start`` is: heads of different
    ranks train in one batch and the zero padding of the factors stays zero.
    """

    def __init__(self, start: torch.Tensor, ranks: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty_like(start))
        orthogonal(self, "weight", orthogonal_map="cayley")
        self.weight = start  # sets the trivialisation base: weight == start, skew part 0
        keep = torch.arange(start.shape[-1], device=start.device) < torch.tensor(ranks, device=start.device)[:, None]  # [n, r]
        mask = (keep[:, :, None] & keep[:, None, :]).to(start.dtype)
        self.parametrizations.weight.original.register_hook(lambda grad: grad * mask)


def local_qat(W: torch.Tensor, F: torch.Tensor, up: torch.Tensor, down: torch.Tensor, bits: int, *,
              steps: int = 50, lr: float = 1e-5, s2_lr: float = 1e-3, start: torch.Tensor | None = None,
              ranks: list[int] | None = None, clip_every: int = 10
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Train S2 [n, r, r] with up [n, d, r] and down [n, r, E] against W, F [n, d, E].

    ``ranks`` (default all r): head i uses only its first ranks[i] latent channels (the rest is
    zero padding); ``start`` must then be blockdiag(orthogonal r_i x r_i, I).

    The clip ratios are searched again every ``clip_every`` steps (the search costs far more
    than a step; between searches the weights move by about ``lr`` per step) and for the
    final objective. Returns the rotated factors (up S2^T, S2 down) in float32, S2, and the
    normalised objective before (at the start rotation) and after training.
    """
    n, r = down.shape[0], down.shape[1]
    Fn = normalized_fisher(F)
    W = W.float()
    rotation = Rotation((start if start is not None else torch.eye(r, device=down.device).expand(n, r, r)).float(),
                         ranks or [r] * n)
    A = up.float().clone().requires_grad_(True)
    B = down.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([{"params": [A, B], "lr": lr}, {"params": rotation.parameters(), "lr": s2_lr}])

    def objective(S2, clips=None):
        product = quantized_product(A @ S2.transpose(-1, -2), S2 @ B, bits, clips)
        return (Fn * (W - product).square()).flatten(1).mean(1).sum()

    with torch.no_grad():
        before = float(objective(rotation.weight))
    with torch.enable_grad():
        for step in range(steps):
            S2 = rotation.weight
            if step % clip_every == 0 and bits < 16:
                clips = search_clips(A @ S2.transpose(-1, -2), S2 @ B, bits)
            opt.zero_grad(set_to_none=True)
            objective(S2, clips if bits < 16 else None).backward()
            opt.step()
    with torch.no_grad():
        S2 = rotation.weight.detach()
        after = float(objective(S2))
        return (A @ S2.transpose(-1, -2)).detach(), (S2 @ B).detach(), S2, {"loss_before": before, "loss_after": after}


class LocalQAT(GraphPass):
    """Per-head S2 + local QAT of every per-head factored q/k/v, against rotated dense targets.

    Run after the rotation passes and before :class:`~wsvd_passes.passes.fake_quant.FakeQuantize`
    with the same weight bits. ``report`` holds the summed objective before/after.
    """

    def __init__(self, targets: dict[tuple[int, str], QATTarget], weight_bits: int, *, steps: int = 50,
                 lr: float = 1e-5, s2_lr: float = 1e-3, seed: int = 0, progress: bool = False):
        self.targets = targets
        self.progress = progress
        self.weight_bits = weight_bits
        self.steps, self.lr, self.s2_lr, self.seed = steps, lr, s2_lr, seed
        self.report = {"loss_before": 0.0, "loss_after": 0.0, "steps": steps, "heads": 0}

    def transform(self, gm: GraphModule, sites: list[AttentionSite]) -> bool:
        for site in tqdm(sites, desc="local QAT", unit="layer", disable=not self.progress or not self.steps, leave=False):
            self._train_layer(gm, site)
        return True

    def _train_layer(self, gm: GraphModule, site: AttentionSite) -> None:
        """q, k and v of one layer as one batch of n_heads + 2 n_kv_heads heads, padded to their largest rank.

        The objective is a sum over heads and Adam acts per element, so each head trains as it would alone, up to
        rounding (S2's gradient is near zero, and Adam's normalisation makes S2 itself sensitive to it; the
        products agree, test_qat). One batch instead of three cuts the per-step overhead, which was most of this
        pass on SmolLM2 (13 ms per step for ~20 MFLOP)."""
        # S2's start per layer from (seed, layer) alone: a streamed layer graph draws what the whole graph draws
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + site.layer)
        heads = {"q": site.n_heads, "k": site.n_kv_heads, "v": site.n_kv_heads}
        blocks = {}  # proj -> (ups [n, d, r_p], downs [n, r_p, E], W' [n, d, E], F' [n, d, E], ranks)
        for p in PROJECTIONS:
            proj, n = getattr(site, f"{p}_proj"), heads[p]
            if (site.layer, p) not in self.targets:
                raise WsvdError(f"layer {site.layer} {p}: no QAT target; measure targets on the same model")
            if not proj.factored or proj.up is None or not factor_spec(proj.node).per_head:
                raise WsvdError(f"layer {site.layer} {p}: local QAT needs per-head factors (granularity 'head')")
            U, D = tensor_attr(gm, proj.up).detach(), tensor_attr(gm, proj.down).detach()
            target, d = self.targets[(site.layer, p)], U.shape[0] // n
            W, F = (t.reshape(n, d, -1).to(U.device) for t in (target.weight, target.fisher))
            if W.shape != (n, d, D.shape[1]):
                raise WsvdError(f"layer {site.layer}: QAT target {tuple(target.weight.shape)} does not match the factors")
            blocks[p] = (head_blocks(U, n).float(), D.reshape(n, D.shape[0] // n, -1).float(), W, F,
                         list(factor_spec(proj.node).ranks))
        r_max = max(down.shape[1] for _, down, *_ in blocks.values())
        ups, downs = (torch.cat(t) for t in zip(*(pad_rank(up, down, r_max) for up, down, *_ in blocks.values())))
        W, F = (torch.cat([b[i] for b in blocks.values()]) for i in (2, 3))
        ranks = [r for *_, rs in blocks.values() for r in rs]
        start = torch.eye(r_max).repeat(len(ranks), 1, 1)
        for h, r in enumerate(ranks):  # one independent draw per head (q, k, v in order), identity on its padding
            start[h, :r, :r] = random_rotations(1, r, generator)[0].float()
        ups, downs, _, losses = local_qat(W, F, ups, downs, self.weight_bits, steps=self.steps, lr=self.lr,
                                          s2_lr=self.s2_lr, start=start.to(ups.device), ranks=ranks)
        self.report["loss_before"] += losses["loss_before"]
        self.report["loss_after"] += losses["loss_after"]
        self.report["heads"] += len(ranks)
        for p, up, down in zip(blocks, ups.split(list(heads.values())), downs.split(list(heads.values()))):
            proj, r_p = getattr(site, f"{p}_proj"), blocks[p][1].shape[1]  # back to the projection's own padding
            replace_tensor_arg(gm, proj.latent, 1, down[:, :r_p].reshape(-1, down.shape[-1]).double(), "qat")
            replace_tensor_arg(gm, proj.node, 1, from_head_blocks(up[:, :, :r_p]).double(), "qat")


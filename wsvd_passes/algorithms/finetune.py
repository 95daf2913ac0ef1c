"""Fisher-weighted local fine-tuning of low-rank factors (WSVD Algorithm 1).

For a batch of n groups of equal shape (e.g. the heads of one projection):

    min_{A, B}  sum_h || F_h^(1/2) * (W_h - A_h B_h) ||_F^2

with W, F [n, m, E], A = up [n, m, r], B = down [n, r, E] and F = E[g * g] the
diagonal Fisher of the dense weight. Adam on float32 master copies (paper: lr 1e-4,
100 steps). F is divided by its mean per group first: raw Fisher values are around
1e-10, below Adam's epsilon, which would otherwise freeze the update. Zero-padded
rank slots get zero gradient and stay exactly zero.
"""

from __future__ import annotations

import torch


def fisher_weighted_error(W: torch.Tensor, F: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Per-group mean of F * (W - up @ down)^2: float [n]."""
    return (F * (W - up @ down).square()).flatten(1).mean(1)


def normalized_fisher(F: torch.Tensor) -> torch.Tensor:
    """F [heads, d, E] in float32, each head's block divided by its mean, so that every head weighs alike in a
    sum of per-head Fisher-weighted errors whatever its gradient scale."""
    F = F.float()
    return F / F.flatten(1).mean(1).clamp_min(torch.finfo(torch.float32).tiny)[:, None, None]


def fisher_finetune(
    W: torch.Tensor, F: torch.Tensor, up: torch.Tensor, down: torch.Tensor, *, steps: int = 100, lr: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Return fine-tuned (up, down) in float32 and the normalised loss before/after."""
    # row-major copies: an SVD's factors are column-major, and bmm into such ``out=`` grads took 40x longer
    W, A, B = W.float(), *(t.float().clone(memory_format=torch.contiguous_format) for t in (up, down))
    Fn = normalized_fisher(F)
    before = float(fisher_weighted_error(W, Fn, A, B).sum())
    # The gradient in closed form, and the fused Adam kernel: autograd's graph of the same loss made three more
    # passes over [n, m, E], and the per-tensor Adam took 3x the time of the matmuls. With
    # G = F * (A B - W), dL/dA = 2 G B^T / (m E) and dL/dB = 2 A^T G / (m E).
    A.grad, B.grad = torch.empty_like(A), torch.empty_like(B)
    opt = torch.optim.Adam([A, B], lr=lr, fused=True)
    scale = 2.0 / (W.shape[1] * W.shape[2])
    for _ in range(steps):
        G = torch.bmm(A, B).sub_(W).mul_(Fn)  # (baddbmm with alpha -1 took 3x a bmm here)
        torch.bmm(G, B.transpose(1, 2), out=A.grad).mul_(scale)
        torch.bmm(A.transpose(1, 2), G, out=B.grad).mul_(scale)
        opt.step()
    after = float(fisher_weighted_error(W, Fn, A, B).sum())
    A.grad = B.grad = None
    return A, B, {"loss_before": before, "loss_after": after}

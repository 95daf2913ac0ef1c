"""Orthogonal Hadamard rotations, sizes that are not powers of two included.

``H = diag(s) H_n / sqrt(n)`` with random signs s (seeded) and H_n a Hadamard matrix
of order n, built by torchao as a Kronecker product of a known order-K matrix
(K in 12, 20, 28, 36, ...) and a Sylvester power of two. float64 [n, n], H H^T = I.
"""

from __future__ import annotations

import torch

from ..errors import WsvdError


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """Seeded random-sign Hadamard rotation of order ``n`` (float64, orthogonal).

    Always a real CPU tensor, also when called under a FakeTensorMode (passes traced on fake
    tensors): torchao caches its base matrices at first use, and a fake one cached there would
    poison every later real call."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torchao.prototype.spinquant.hadamard_utils import random_hadamard_matrix

    try:
        with unset_fake_temporarily():
            H = random_hadamard_matrix(n, "cpu", seed=seed)
    except (AssertionError, TypeError):  # torchao asserts when n / K is not a power of two
        H = None
    if H is None or tuple(H.shape) != (n, n):
        raise WsvdError(f"no Hadamard matrix of order {n} is known (orders are 2^k times 1, 12, 20, 28, 36, 40, "
                        "44, 52, 60, 108, 140, 156 or 172); rotation needs such a hidden / head / MLP size")
    # torchao stores some base matrices in float32: snap the +-1/sqrt(n) entries back to exact values
    with unset_fake_temporarily():
        return torch.round(H.double() * n**0.5) / n**0.5

"""Orthogonal Hadamard rotations, sizes that are not powers of two included, as dense matrices and as a
structured transform.

``H = diag(s) (H_K^T kron H_M) / sqrt(n)`` for n = K M with random signs s (seeded), H_K a known Hadamard
matrix of order K in 1, 12, 20, 28, 36, ... (torchao's table, not symmetric) and H_M the Sylvester (Walsh) matrix of
order M = 2^m, H_M[a, b] = (-1)^popcount(a & b), symmetric. H H^T = I. This is the matrix torchao's
``random_hadamard_matrix`` builds (the same signs for the same seed, tested).

:func:`hadamard_rotate` applies x -> x H without forming H: x (.) s / sqrt(n) viewed as [K, M1, M2]
(M = M1 M2, H_M = H_M1 kron H_M2, both Sylvester), then one small matmul per axis, n (K + M1 + M2)
multiply-adds per row instead of n^2 (:func:`hadamard_macs`; n = 1536: 55,296 instead of 2,359,296; n = 11008,
Llama-2-7B's MLP: 2.07 M instead of 121 M).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import WsvdError


@dataclasses.dataclass(frozen=True)
class HadamardFactors:
    """The factors of ``H = diag(signs) (k^T kron m1 kron m2)`` (float64; ``signs`` = s / sqrt(n)), in the order
    :func:`hadamard_rotate` takes them (:data:`FACTOR_NAMES`)."""

    signs: torch.Tensor  # [n]
    k: torch.Tensor  # [K, K], entries +-1
    m1: torch.Tensor  # [M1, M1] Sylvester
    m2: torch.Tensor  # [M2, M2] Sylvester

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in FACTOR_NAMES)


FACTOR_NAMES = tuple(f.name for f in dataclasses.fields(HadamardFactors))


def sylvester(m: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order m = 2^j: H[a, b] = (-1)^popcount(a & b)."""
    bits = (torch.arange(m)[:, None] & torch.arange(m)[None, :]).to(torch.int64)
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype)


def hadamard_factors(n: int, seed: int) -> HadamardFactors:
    """The factors of the seeded random-sign Hadamard rotation of order ``n`` (float64, real CPU tensors).

    Always real CPU tensors, also when called under a FakeTensorMode (passes traced on fake tensors):
    torchao caches its base matrices at first use, and a fake one cached there would poison every later
    real call."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torchao.prototype.spinquant.hadamard_utils import get_hadK

    with unset_fake_temporarily():
        try:
            had_k, k = get_hadK(n)
        except AssertionError:  # torchao asserts when n / K is not a power of two
            had_k, k = None, None
        if had_k is None or n % k or (n // k) & (n // k - 1):
            raise WsvdError(f"no Hadamard matrix of order {n} is known (orders are 2^k times 1, 12, 20, 28, 36, 40, "
                            "44, 52, 60, 108, 140, 156 or 172); rotation needs such a hidden / head / MLP size")
        # the seeded signs of torchao's random_hadamard_matrix, so a seed names the same rotation
        gen = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
        m = n // k
        m1 = 2 ** (int(math.log2(m)) // 2)
        # torchao stores some base matrices in float32: their entries are exactly +-1
        return HadamardFactors(signs / math.sqrt(n), torch.round(had_k.double()), sylvester(m1), sylvester(m // m1))


def hadamard_rotate(x: torch.Tensor, signs: torch.Tensor, had_k: torch.Tensor, had_m1: torch.Tensor,
                    had_m2: torch.Tensor) -> torch.Tensor:
    """x H for x [..., n] and the factors of H (:class:`HadamardFactors`, in x's dtype and device), without
    forming H: with X = (x (.) signs) viewed [..., K, M1, M2],

        Y[k, a, b] = sum_{k', a', b'} had_k[k, k'] had_m1[a, a'] had_m2[b', b] X[k', a', b']

    (the Sylvester factors are symmetric), Y flattened to [..., n]. Differentiable (plain torch ops)."""
    k, m1, m2 = had_k.shape[0], had_m1.shape[0], had_m2.shape[0]
    y = (x * signs).unflatten(-1, (k, m1, m2))
    y = y @ had_m2
    y = torch.einsum("ij,...jb->...ib", had_m1, y)  # mixes M1 (y's last two axes are [M1, M2])
    y = torch.einsum("ij,...jab->...iab", had_k, y)
    return y.flatten(-3)


def hadamard_macs(n: int) -> tuple[int, int]:
    """Multiply-adds per row of x -> x H: (structured, dense n^2)."""
    f = hadamard_factors(n, 0)
    return n * (f.k.shape[0] + f.m1.shape[0] + f.m2.shape[0]), n * n


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """Seeded random-sign Hadamard rotation of order ``n`` as a dense matrix (float64 [n, n], orthogonal, real CPU
    tensor): the rows of :func:`hadamard_rotate` applied to the identity."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return hadamard_rotate(torch.eye(n, dtype=torch.float64), *hadamard_factors(n, seed).tensors())

"""The layout of a factored projection, as :class:`~wsvd_passes.factorize.FactorizeQKV` recorded it.

The factorisation pass stores, next to each up-projection ``<attn>.wsvd.{p}_up``, the buffer
``<attn>.wsvd.{p}_ranks`` (int64, the kept rank per latent block) and once per layer
``<attn>.wsvd.granularity`` (int64 code of "joint", "projection" or "head"). Buffers survive re-export,
artifacts and every later pass, so this is the one place later passes and lowering read the layout from:
nothing re-derives it by probing the factors for zeros.

    joint       one latent C [.., r] shared by q, k and v                  blocks 1, width r
    projection  one latent per projection C_p [.., r_p]                     blocks 1, width r_p
    head        per projection, heads blocks of width r_max (ranks padded
                to the largest with zero rows of D, zero columns of U)      blocks n_heads, width r_max
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule

from .errors import WsvdError

GRANULARITIES = ("joint", "projection", "head")


@dataclasses.dataclass(frozen=True)
class FactorSpec:
    granularity: str
    blocks: int  # latent blocks: the heads of per-head factors, else 1
    ranks: tuple[int, ...]  # kept rank per block
    width: int  # latent columns per block (per-head ranks padded to the largest)

    @property
    def per_head(self) -> bool:
        return self.granularity == "head"


def ranks_target(up: str) -> str:
    """The rank buffer that goes with an up-projection target (``.../wsvd.k_up[_suffix]`` -> ``.../wsvd.k_ranks``).

    Passes that replace a factor append a suffix to its name; the rank buffer keeps its own.
    """
    owner, _, leaf = up.rpartition(".")
    return f"{owner}.{leaf.partition('_up')[0]}_ranks"


def granularity_target(up: str) -> str:
    """The layer's granularity buffer, beside its factors."""
    return f"{up.rpartition('.')[0]}.granularity"


def granularity_code(granularity: str) -> torch.Tensor:
    return torch.tensor(GRANULARITIES.index(granularity), dtype=torch.long)


def factor_spec(gm: GraphModule, up: str, latent_width: int) -> FactorSpec:
    """The layout of the factored projection whose up-projection is the tensor ``up`` and whose latent
    (the up-projection's input) has ``latent_width`` columns."""
    try:
        ranks = tuple(gm.get_buffer(ranks_target(up)).tolist())
        granularity = GRANULARITIES[int(gm.get_buffer(granularity_target(up)))]
    except AttributeError:
        raise WsvdError(f"{up}: no factor layout recorded beside it (factor the graph with FactorizeQKV)") from None
    blocks = len(ranks) if granularity == "head" else 1
    if latent_width % blocks:
        raise WsvdError(f"{up}: a latent of {latent_width} columns does not split into {blocks} heads")
    return FactorSpec(granularity, blocks, ranks, latent_width // blocks)

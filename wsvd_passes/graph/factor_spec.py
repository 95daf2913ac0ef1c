"""The layout of a factored projection, as :class:`~wsvd_passes.passes.factorize.FactorizeQKV` recorded it.

The factorisation pass puts a :class:`FactorSpec` in the meta of each up-projection node it creates
(``node.meta["wsvd_factor"]``, state carried in node meta as torch.ao's pt2e does), and the rank per
latent block in the buffer ``<attn>.wsvd.{p}_ranks`` beside the factors. Later passes keep the node
(they replace its tensors, not the node) and lowering reads the cache shapes, so this is the one place
the layout is read from: nothing re-derives it by probing the factors for zeros, and it works on fake
tensors. Artifacts rebuild it by replaying the passes.

    joint       one latent C [.., r] shared by q, k and v                  blocks 1, width r
    projection  one latent per projection C_p [.., r_p]                     blocks 1, width r_p
    head        per projection, heads blocks of width r_max (ranks padded
                to the largest with zero rows of D, zero columns of U)      blocks n_heads, width r_max
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import Node

from ..errors import WsvdError

FACTOR_META = "wsvd_factor"


@dataclasses.dataclass(frozen=True)
class FactorSpec:
    granularity: str
    blocks: int  # latent blocks: the heads of per-head factors, else 1
    ranks: tuple[int, ...]  # kept rank per block
    width: int  # latent columns per block (per-head ranks padded to the largest)

    @property
    def per_head(self) -> bool:
        return self.granularity == "head"


def head_blocks(U: torch.Tensor, n: int, *, shared: bool = False) -> torch.Tensor:
    """What head h's output reads of an up-projection U: rows h d..(h+1) d, and of a per-head latent
    (U [n d, n w], block-diagonal) h's own columns h w..(h+1) w; of a latent ``shared`` by the n heads
    (U [n d, w]) all of them. -> [n, d, w]."""
    rows = U.unflatten(0, (n, -1))
    if shared:
        return rows
    w = U.shape[1] // n
    return torch.stack([rows[h, :, h * w:(h + 1) * w] for h in range(n)])


def from_head_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """The per-head up-projection of head blocks [n, d, w]: block-diagonal [n d, n w] (the inverse of
    :func:`head_blocks`)."""
    return torch.block_diag(*blocks.unbind())


def pad_rank(up: torch.Tensor, down: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors up [.., d, r] and down [.., r, E] padded to rank ``width``: zero columns of up, zero rows of down
    (the product is unchanged)."""
    pad = torch.nn.functional.pad
    return pad(up, (0, width - up.shape[-1])), pad(down, (0, 0, 0, width - down.shape[-2]))


def ranks_target(up: str) -> str:
    """The rank buffer that goes with an up-projection target (``.../wsvd.k_up[_suffix]`` -> ``.../wsvd.k_ranks``).

    Passes that replace a factor append a suffix to its name; the rank buffer keeps its own.
    """
    owner, _, leaf = up.rpartition(".")
    return f"{owner}.{leaf.partition('_up')[0]}_ranks"


def factor_spec(up_node: Node) -> FactorSpec:
    """The layout recorded on a factored projection's up-projection node."""
    spec = up_node.meta.get(FACTOR_META)
    if spec is None:
        raise WsvdError(f"{up_node.name}: no factor layout recorded on it (factor the graph with FactorizeQKV)")
    return spec

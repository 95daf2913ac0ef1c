"""What :class:`~wsvd_passes.passes.fake_quant.FakeQuantize` quantised, recorded on the graph.

State carried in node meta, as torch.ao's pt2e ``prepare``/``convert`` do: each quantised
``aten.linear`` node (and each ``aten.embedding`` lookup of a quantised table, ``--bits ..e8``)
gets a :class:`QuantSpec` in ``node.meta["wsvd_quant"]``. Its weight
get_attr holds the dequantised values ``codes * scale`` (what evaluation computes with) and
the per-row scale is a buffer beside it (``<weight>_scale`` [out], float32), so the integer
codes are recovered exactly as ``round(W / scale)`` (|codes| <= 2^(bits-1) - 1). Later passes
keep the linear node and its weight, and the consumers read the layout from here instead of
re-deriving it: packed artifacts (:mod:`wsvd_passes.artifacts.packing`) and healing (which re-quantises
the factors it trains and so rewrites their scales).

The activation quantiser itself is the ``fake_quant_activation(x, bits, group=..., clip=...)`` node
feeding the linear; the spec repeats its bits and group so that a consumer needs one lookup, and names what the
input is (:func:`input_role`, e.g. ``layer3.down_proj``: what ``--bits w4a4+down_proj`` selects and what
``examples/lowbit_breakdown.py`` reports).
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch.fx import GraphModule, Node

from ..errors import WsvdError

QUANT_META = "wsvd_quant"
aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    weight_bits: int  # 16: weight not quantised
    activation_bits: int  # 16: input not quantised
    activation_group: int | None  # features per activation scale (None: one scale per token)
    scale: str | None  # get_attr target of the weight's per-row scale [out] (None when not quantised)
    role: str | None = None  # what the input is, ``layer3.down_proj`` (:func:`input_role`); None: LM head, embedding


# module (the last part of its path) -> kind of its input (ACTIVATION_KINDS); a factored projection's
# up-projection reads the latent instead
_INPUT_KINDS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o_proj", "gate_proj": "gate_up",
                "up_proj": "gate_up", "down_proj": "down_proj"}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def input_role(module: str, latent: bool) -> str | None:
    """``layer3.down_proj``: the decoder layer and the kind (:data:`~wsvd_passes.algorithms.quantize.ACTIVATION_KINDS`)
    of the input of a linear of module ``module`` (its export path, ``model.layers.3.mlp.down_proj``), ``latent``: it
    reads a factor latent; None outside the decoder layers' known projections (e.g. a vision tower's)."""
    layer, leaf = _LAYER.search(module), module.rpartition(".")[2]
    if layer is None or (leaf not in _INPUT_KINDS and not latent):
        return None
    return f"layer{layer.group(1)}.{'latent' if latent else _INPUT_KINDS[leaf]}"


def quant_spec(node: Node) -> QuantSpec | None:
    """The spec recorded on a linear node, or None when FakeQuantize left it alone."""
    return node.meta.get(QUANT_META)


def quantized_linears(gm: GraphModule) -> list[Node]:
    """The linear nodes that carry a :class:`QuantSpec`, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and QUANT_META in n.meta
            and n.target is not aten.embedding.default]


def weight_target(node: Node) -> str:
    """The get_attr target of a quantised node's weight (an embedding's table, a linear's weight)."""
    return node.args[0 if node.target is aten.embedding.default else 1].target


def quantized_weights(gm: GraphModule) -> dict[str, tuple[int, str]]:
    """Quantised weight target -> (bits, scale target), for the weights quantised to 8 bits or fewer."""
    out = {}
    for node in gm.graph.nodes:
        spec = quant_spec(node) if node.op == "call_function" else None
        if spec is not None and spec.weight_bits <= 8:
            out[weight_target(node)] = (spec.weight_bits, spec.scale)
    return out


def weight_codes(weight: torch.Tensor, scale: torch.Tensor, bits: int, name: str) -> torch.Tensor:
    """The int8 codes ``round(W / scale)`` [out, in] of a recorded quantised weight ``name``; one error line
    when W is not on its scale's grid (|codes| > 2^(bits-1) - 1: the graph was edited after FakeQuantize)."""
    codes = torch.round(weight.detach().float() / scale.detach().float()[:, None])
    if codes.numel() and float(codes.abs().max()) > 2 ** (bits - 1) - 1:
        raise WsvdError(f"{name} is not on the {bits}-bit grid of its recorded scale: the graph was edited after "
                        "FakeQuantize; compress again")
    return codes.to(torch.int8)

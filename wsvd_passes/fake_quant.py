"""Fake-quant pass: quantise-dequantise the weights and input activations of linear layers.

Every ``aten.linear`` is quantised except the LM head (its output is the logits) and
the online Hadamard transforms (fixed rotations, not weights). For each:

- weight W [out, in]: per-output-channel symmetric RTN at ``bits.weight`` bits with a
  per-row clipping search (:func:`~wsvd_passes.quantize.search_weight_clip`); the
  quantised weight replaces W (computed once: weights are static);
- input activation: a ``fake_quant_activation`` node (per token, dynamic) at
  ``bits.activation`` bits; for the up-projection of per-head factors the input is the
  latent [.., heads * r_max] and is quantised per token per head (group r_max), the
  granularity the decode kernel uses; a joint latent is quantised per token.

``bits >= 16`` leaves that side untouched, so W16A16 is the identity.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from .factorize import block_diagonal
from .graph_utils import copy_meta, infer_val, tensor_attr
from .pipeline import GraphPass
from .quantize import Bits, fake_quant_activation, fake_quant_weight, search_weight_clip
from .rotate import replace_tensor_arg
from .sites import AttentionSite

aten = torch.ops.aten


class FakeQuantize(GraphPass):
    def __init__(self, bits: Bits, *, clip_search: bool = True, progress: bool = False):
        self.bits = bits
        self.clip_search = clip_search
        self.progress = progress

    def transform(self, gm: GraphModule, sites: list[AttentionSite]) -> bool:
        if self.bits.weight >= 16 and self.bits.activation >= 16:
            return False
        output = next(n for n in gm.graph.nodes if n.op == "output")
        logits = {a for a in output.all_input_nodes}
        groups = _latent_groups(gm, sites)
        linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.linear.default]
        for node in tqdm(linears, desc="fake-quant (clip search)", unit="linear", leave=False,
                         disable=not (self.progress and self.clip_search and self.bits.weight < 16)):
            if node in logits:
                continue
            weight = node.args[1]
            if weight.op != "get_attr" or weight.target.endswith("online_hadamard"):
                continue
            if self.bits.weight < 16:
                W = tensor_attr(gm, weight.target).detach().float()
                clip = search_weight_clip(W, self.bits.weight) if self.clip_search else None
                replace_tensor_arg(gm, node, 1, fake_quant_weight(W, self.bits.weight, clip_ratio=clip), f"w{self.bits.weight}")
            if self.bits.activation < 16:
                x = node.args[0]
                with gm.graph.inserting_before(node):
                    q = gm.graph.call_function(fake_quant_activation, (x, self.bits.activation),
                                               {"group": groups.get(node)})
                node.replace_input_with(x, infer_val(gm, copy_meta(q, node)))
        return True


def _latent_groups(gm: GraphModule, sites: list[AttentionSite]) -> dict[Node, int]:
    """Up-projection node -> latent width per head, for per-head factors (block-diagonal U)."""
    groups = {}
    for site in sites:
        for proj, heads in ((site.q_proj, site.n_heads), (site.k_proj, site.n_kv_heads), (site.v_proj, site.n_kv_heads)):
            if proj.factored and proj.up is not None and heads > 1 and block_diagonal(tensor_attr(gm, proj.up), heads):
                groups[proj.node] = tensor_attr(gm, proj.down).shape[0] // heads
    return groups

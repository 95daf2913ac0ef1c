"""Real int8 execution: W8A8 linears -> ``wsvd::int8_linear`` (``torch._int_mm``, int8 x int8 -> int32).

Matched from the recorded quantisation state, not by shape: a linear whose
:class:`~wsvd_passes.quant_spec.QuantSpec` says 8-bit weights and 8-bit per-token activations,
reading ``fake_quant_activation(x, 8)``,

    linear(fake_quant_activation(x, 8), W, b)       W = codes_w * s_w  (s_w [out]: the recorded scale)

becomes

    int8_linear(x, codes_w, s_w, b)                 codes_w = round(W / s_w) int8 [out, in]

which quantises x per token exactly as the fake quantiser does and multiplies the codes in integers, so
the two agree up to float32 rounding (the int32 sum is exact; the fake path sums float products). The
float weight is dropped, the int8 codes are a buffer beside it (``<weight>_int8``), and the spec moves to
the new node. Everything else stays simulated and is counted: linears with another bit width
(W4A4, W8A4: no integer kernel here), and per-head grouped activations (the latent up-projections,
one scale per head and token). Works on full-sequence, decode, latent and lowered graphs; run it
last: the int8 node is not an ``aten.linear``, so attention sites are no longer found afterwards (it is a
plain fx pass, not a site :class:`~wsvd_passes.pipeline.GraphPass`, for that reason).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

import lowering.ops  # noqa: F401  (registers torch.ops.wsvd.int8_linear)
from wsvd_passes.capture import CapturedGraph
from wsvd_passes.graph_utils import add_tensor_attr, copy_meta, get_attr_node, infer_val, remove_attr_if_unused, tensor_attr
from wsvd_passes.pipeline import Pipeline
from wsvd_passes.quant_spec import QUANT_META, quant_spec, quantized_linears, weight_codes
from wsvd_passes.quantize import fake_quant_activation

INT8_SPEC = (8, 8, None)  # (weight bits, activation bits, activation group) that run in integers


class Int8Linears(PassBase):
    """Replace every W8A8 per-token linear by ``wsvd::int8_linear``; ``counts`` says how many and what stayed."""

    def __init__(self):
        self.counts = {"int8": 0, "simulated": 0}

    def call(self, gm: GraphModule) -> PassResult:
        for node in quantized_linears(gm):
            spec = quant_spec(node)
            x = node.args[0]
            fake = (x.op == "call_function" and x.target is fake_quant_activation and x.args[1] == 8
                    and x.kwargs.get("group") is None)
            if (spec.weight_bits, spec.activation_bits, spec.activation_group) != INT8_SPEC or not fake:
                self.counts["simulated"] += 1
                continue
            weight = node.args[1].target
            codes = weight_codes(tensor_attr(gm, weight), tensor_attr(gm, spec.scale), 8, weight)
            add_tensor_attr(gm, f"{weight}_int8", codes, parameter=False)
            bias = node.args[2] if len(node.args) > 2 else None
            with gm.graph.inserting_before(node):
                args = (x.args[0], get_attr_node(gm, f"{weight}_int8", node), get_attr_node(gm, spec.scale, node), bias)
                new = infer_val(gm, copy_meta(gm.graph.call_function(torch.ops.wsvd.int8_linear.default, args), node))
            new.meta[QUANT_META] = spec
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            if not x.users:
                gm.graph.erase_node(x)
            remove_attr_if_unused(gm, weight)
            self.counts["int8"] += 1
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, self.counts["int8"] > 0)


def lower_int8(captured: CapturedGraph) -> dict[str, int]:
    """Run :class:`Int8Linears` on ``captured`` in place; returns its counts."""
    rewrite = Int8Linears()
    Pipeline([rewrite], verify=False)(captured)
    return rewrite.counts

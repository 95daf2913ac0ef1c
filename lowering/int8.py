"""Real int8 execution: W8A8 linears -> :func:`int8_linear` (``torch._int_mm``, int8 x int8 -> int32), the
e8 LM head included; an 8-bit embedding table (``--bits ..e8``) -> :func:`int8_embedding`.

Matched from the recorded quantisation state, not by shape: a linear whose
:class:`~wsvd_passes.graph.quant_spec.QuantSpec` says 8-bit weights and 8-bit per-token activations,
reading ``fake_quant_activation(x, 8)``,

    linear(fake_quant_activation(x, 8), W, b)       W = codes_w * s_w  (s_w [out]: the recorded scale)

becomes

    int8_linear(x, codes_w, s_w, b)                 codes_w = round(W / s_w) int8 [out, in]

which quantises x per token exactly as the fake quantiser does and multiplies the codes in integers, so
the two agree up to float32 rounding (the int32 sum is exact; the fake path sums float products). The
float weight is dropped, the int8 codes are a buffer beside it (``<weight>_int8``), and the spec moves to
the new node. An 8-bit embedding table becomes an int8 lookup times its row scales (exact). A per-head
latent up-projection (activations quantised per token and head, weight block-diagonal by head, as its
recorded :class:`~wsvd_passes.graph.factor_spec.FactorSpec` says) runs the same way, each output block times its
head's scale. Everything else stays simulated and is counted: linears with another bit width (W4A4, W8A4:
no integer kernel here). Works on full-sequence, decode, latent and lowered graphs; run it
last: the int8 node is not an ``aten.linear``, so attention sites are no longer found afterwards (it is a
plain fx pass, not a site :class:`~wsvd_passes.graph.pipeline.GraphPass`, for that reason).

The two are plain functions called from the graph (as ``fake_quant_activation`` is), not opaque
``torch.library`` ops: ``torch.compile`` traces through them and fuses the activation quantiser and the
scaling around ``torch._int_mm``; as an opaque op the same step ran 3x slower at one token (20 W8A8
linears of [576, 576], 56 ms against 18 ms on 2 CPU cores).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from wsvd_passes.algorithms.quantize import fake_quant_activation, quantize_activation
from wsvd_passes.graph.capture import CapturedGraph
from wsvd_passes.graph.factor_spec import FACTOR_META
from wsvd_passes.graph.graph_utils import (
    add_tensor_attr,
    copy_meta,
    get_attr_node,
    infer_val,
    remove_attr_if_unused,
    tensor_attr,
)
from wsvd_passes.graph.pipeline import Pipeline
from wsvd_passes.graph.quant_spec import QUANT_META, quant_spec, weight_codes, weight_target

aten = torch.ops.aten


def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None = None, group: int | None = None) -> torch.Tensor:
    """W8A8 linear in integers: x [..., in] float is quantised per token (:func:`quantize_activation`, 8 bits),
    ``int8 codes x int8 weight [out, in] -> int32`` (``torch._int_mm``), then times the token scale and the
    weight's row scale ``weight_scale`` [out] (float32), plus ``bias``; [..., out] in x's dtype. Equals
    ``linear(fake_quant_activation(x, 8, group=group), codes_w * weight_scale, bias)`` up to float32 rounding
    (the integer sum is exact).

    With ``group`` (a per-head latent: one scale per token and head), x is quantised per group of ``group``
    features, G = in / group scales per token, and ``weight`` must be block-diagonal: G blocks
    [out / G, group], block h reading group h only (a per-head up-projection). Then output block h is
    ``acc[:, block h] * scale[:, h] * weight_scale[block h]`` exactly, since the codes outside the blocks are 0."""
    codes, scale = quantize_activation(x.reshape(-1, x.shape[-1]), 8, group=group)
    acc = _int_mm(codes, weight)
    scale = scale.reshape(-1, 1) if group is None else scale.repeat_interleave(weight.shape[0] // scale.shape[-1], dim=-1)
    out = acc.float() * scale * weight_scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


def int8_embedding(weight: torch.Tensor, weight_scale: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Lookup in an int8 table: rows ``codes[ids] * weight_scale[ids]`` (codes [V, E] int8, scale [V]) -> [..., E] in
    the scale's dtype; equals ``embedding(codes * weight_scale, ids)`` exactly."""
    return torch.nn.functional.embedding(ids, weight).to(weight_scale.dtype) * weight_scale[ids][..., None]


def _int_mm(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """int32 a [m, k] @ weight [n, k]^T. CUDA's ``torch._int_mm`` needs m > 16 and k, n multiples of 8: the
    operands are zero-padded there (exact) and the result sliced. On the CPU one row is padded to two: inductor
    may view a one-row operand with row stride 0, which the CPU ``_int_mm`` (oneDNN) silently computes wrong
    (sums off by 1e6; pytorch/pytorch#195066, open in torch 2.13)."""
    if not a.is_cuda:
        if a.shape[0] == 1:
            return torch._int_mm(torch.nn.functional.pad(a, (0, 0, 0, 1)), weight.t())[:1]
        return torch._int_mm(a, weight.t())
    m, k, n = a.shape[0], a.shape[1], weight.shape[0]
    up8 = lambda v: -(-v // 8) * 8  # noqa: E731
    a = torch.nn.functional.pad(a, (0, up8(k) - k, 0, max(32, up8(m)) - m))
    weight = torch.nn.functional.pad(weight, (0, up8(k) - k, 0, up8(n) - n))
    return torch._int_mm(a, weight.t())[:m, :n]


class Int8Linears(PassBase):
    """Run every 8-bit weight in integers; ``counts`` says how many of each kind and how many stayed simulated."""

    def __init__(self):
        self.counts = {"int8": 0, "int8_embedding": 0, "simulated": 0}

    def call(self, gm: GraphModule) -> PassResult:
        for node in [n for n in gm.graph.nodes if n.op == "call_function" and quant_spec(n) is not None]:
            spec = quant_spec(node)
            weight = weight_target(node)
            x = node.args[1] if node.target is aten.embedding.default else node.args[0]
            fake = (x.op == "call_function" and x.target is fake_quant_activation and x.args[1] == 8
                    and x.kwargs.get("group") == spec.activation_group and x.kwargs.get("clip") is None)
            bias = node.args[2] if node.target is aten.linear.default and len(node.args) > 2 else None
            if spec.weight_bits != 8:
                kind = None
            elif node.target is aten.embedding.default:
                kind, op, inputs = "int8_embedding", int8_embedding, (x,)
            elif spec.activation_bits == 8 and fake and _blocks_match_groups(node, spec.activation_group,
                                                                                        tensor_attr(gm, weight).shape):
                kind, op, inputs = "int8", int8_linear, (x.args[0],)
            else:
                kind = None
            if kind is None:
                self.counts["simulated"] += 1
                continue
            codes = weight_codes(tensor_attr(gm, weight), tensor_attr(gm, spec.scale), 8, weight)
            add_tensor_attr(gm, f"{weight}_int8", codes, parameter=False)
            with gm.graph.inserting_before(node):
                tables = (get_attr_node(gm, f"{weight}_int8", node), get_attr_node(gm, spec.scale, node))
                args = tables + inputs if kind == "int8_embedding" else inputs + tables + (bias, spec.activation_group)
                new = infer_val(gm, copy_meta(gm.graph.call_function(op, args), node))
            new.meta[QUANT_META] = spec
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            if kind == "int8" and not x.users:
                gm.graph.erase_node(x)
            remove_attr_if_unused(gm, weight)
            self.counts[kind] += 1
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, self.counts["int8"] + self.counts["int8_embedding"] > 0)


def _blocks_match_groups(node, group: int | None, weight_shape: torch.Size) -> bool:
    """Whether a linear quantised per ``group`` input features is block-diagonal with one block per group (a
    per-head up-projection, from its recorded :class:`~wsvd_passes.graph.factor_spec.FactorSpec`): what
    :func:`int8_linear` needs to apply one scale per group after the integer matmul."""
    if group is None:
        return True
    spec = node.meta.get(FACTOR_META)
    out_features, in_features = weight_shape
    return (spec is not None and spec.per_head and spec.width == group and spec.blocks * group == in_features
            and out_features % spec.blocks == 0)


def lower_int8(captured: CapturedGraph) -> dict[str, int]:
    """Run :class:`Int8Linears` on ``captured`` in place; returns its counts."""
    rewrite = Int8Linears()
    Pipeline([rewrite], verify=False)(captured)
    return rewrite.counts

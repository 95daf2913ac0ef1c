"""Fake-quant pass: quantise-dequantise the weights and input activations of linear layers.

Every ``aten.linear`` is quantised except the LM head (its output is the logits) and the fixed
linears the rotation passes insert (:func:`~wsvd_passes.passes.rotate.fixed_rotation`: online Hadamards,
a VLM's ``inputs_embeds`` rotation, a tied head's gamma); by default the embeddings stay in full
precision, as in QuaRot. For each:

- weight W [out, in]: per-output-channel symmetric RTN at ``bits.weight`` bits with a
  per-row clipping search (:func:`~wsvd_passes.algorithms.quantize.search_weight_clip`); W is replaced
  by ``codes * scale`` (computed once: weights are static) and the scale [out] is kept as a
  buffer ``<weight>_scale``, so the integer codes are exact (:mod:`wsvd_passes.graph.quant_spec`);
- input activation: a ``fake_quant_activation`` node (per token, dynamic) at
  ``bits.activation`` bits, on the clipped range ``bits.activation_clip * max|x|`` when that is set; the inputs
  that ``bits.a8`` names (by :func:`~wsvd_passes.graph.quant_spec.input_role`) at 8 bits, unclipped; for the
  up-projection of per-head factors the input is the latent [.., heads * r_max] and is quantised per token per
  head (group r_max, from the recorded :class:`~wsvd_passes.graph.factor_spec.FactorSpec`), the granularity the
  decode kernel uses; a joint latent is quantised per token.

With ``bits.embedding < 16`` (``--bits w8a8e8``) the token-embedding table and the LM head weight are
quantised per row the same way, and the LM head's input per token at 8 bits, as llama.cpp's Q8_0 dot
products do (measured on SmolLM2 wsvd W8A8: KL +0.0004; the int8 runtime then runs the head as an
int8 x int8 matmul, 2-6x faster than float32 on this CPU, where a weight-only int8 matmul was 7-12x
slower): the lookup returns rows of ``codes * scale``. A tied head reads a table equal to the embedding's (see
:class:`~wsvd_passes.passes.rotate.RotateResidual`), so both quantise to the same codes and are stored once.

Each quantised linear (and embedding lookup) records a :class:`~wsvd_passes.graph.quant_spec.QuantSpec` in its
meta. ``bits >= 16`` leaves that side untouched, so W16A16 is the identity.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from ..algorithms.quantize import EXCEPTION_BITS, Bits, fake_quant_activation, quantize_weight, search_weight_clip
from ..errors import WsvdError
from ..graph.factor_spec import factor_spec
from ..graph.graph_utils import add_tensor_attr, copy_meta, is_call, logits_linears, tensor_attr, val_like
from ..graph.pipeline import GraphPass
from ..graph.quant_spec import QUANT_META, QuantSpec, input_role
from ..graph.sites import AttentionSite, module_path
from .rotate import fixed_rotation, replace_tensor_arg

aten = torch.ops.aten
HEAD_ACTIVATION_BITS = 8  # an e8/e4 LM head reads its input at 8 bits per token (int8 x int8 in the int8 runtime)


class FakeQuantize(GraphPass):
    def __init__(self, bits: Bits, *, clip_search: bool = True, progress: bool = False):
        self.bits = bits
        self.clip_search = clip_search
        self.progress = progress

    def transform(self, gm: GraphModule, sites: list[AttentionSite]) -> bool:
        if min(self.bits.weight, self.bits.activation, self.bits.embedding) >= 16:
            return False
        heads = logits_linears(gm)
        if self.bits.embedding < 16:
            tables = [n for n in gm.graph.nodes if is_call(n, aten.embedding.default)]
            for node in tables + heads:
                scale = self._quantize_weight(gm, node, self.bits.embedding)
                if node in heads:
                    self._quantize_input(gm, node, HEAD_ACTIVATION_BITS, None)
                node.meta[QUANT_META] = QuantSpec(self.bits.embedding, HEAD_ACTIVATION_BITS if node in heads else 16,
                                                  None, scale)
        groups = _latent_groups(sites)
        latents = {p.node for s in sites for p in (s.q_proj, s.k_proj, s.v_proj) if p.factored}
        exceptions = resolve_exceptions(self.bits, sites)
        linears = [n for n in gm.graph.nodes if is_call(n, aten.linear.default)]
        for node in tqdm(linears, desc="fake-quant (clip search)", unit="linear", leave=False,
                         disable=not (self.progress and self.clip_search and self.bits.weight < 16)):
            weight = node.args[1]
            if node in heads or weight.op != "get_attr" or fixed_rotation(weight.target):
                continue
            scale = self._quantize_weight(gm, node, self.bits.weight) if self.bits.weight < 16 else None
            group = groups.get(node)
            role = input_role(module_path(node), node in latents)
            if role is None and exceptions:
                raise WsvdError(f"cannot name the input of linear {module_path(node)!r} (outside the decoder layers' "
                                "q/k/v/o/gate/up/down projections): 8-bit exceptions work on Llama-style decoders")
            bits, clip = activation_quantiser(self.bits, role, exceptions)
            if bits < 16:
                self._quantize_input(gm, node, bits, group, clip)
            node.meta[QUANT_META] = QuantSpec(self.bits.weight, bits, group, scale, role)
        return True

    @staticmethod
    def _quantize_input(gm: GraphModule, node: Node, bits: int, group: int | None, clip: float | None = None) -> None:
        x = node.args[0]
        with gm.graph.inserting_before(node):
            kwargs = {"group": group} | ({"clip": clip} if clip is not None else {})
            q = gm.graph.call_function(fake_quant_activation, (x, bits), kwargs)
        node.replace_input_with(x, val_like(copy_meta(q, node), x))  # fake-quant keeps X's shape and dtype

    def _quantize_weight(self, gm: GraphModule, node: Node, bits: int) -> str:
        """Replace the weight (a linear's, an embedding's table) by ``codes * scale``; the scale's target."""
        index = 0 if node.target is aten.embedding.default else 1
        W = tensor_attr(gm, node.args[index].target).detach().float()
        clip = search_weight_clip(W, bits) if self.clip_search else None
        codes, row_scale = quantize_weight(W, bits, clip_ratio=clip)
        replace_tensor_arg(gm, node, index, codes.to(row_scale.dtype) * row_scale[:, None], f"w{bits}")
        scale = f"{node.args[index].target}_scale"
        add_tensor_attr(gm, scale, row_scale, parameter=False)
        return scale


def activation_quantiser(bits: Bits, role: str | None, exceptions: set[str]) -> tuple[int, float | None]:
    """(bits, clip ratio) of the activation quantiser of an input named ``role`` (``layer3.down_proj``, None outside the
    decoder layers) under ``bits``, whose exceptions :func:`resolve_exceptions` gives."""
    if role is not None and set(role.split(".")) & exceptions:
        return EXCEPTION_BITS, None
    return bits.activation, bits.activation_clip


def resolve_exceptions(bits: Bits, sites: list[AttentionSite]) -> set[str]:
    """``bits.a8`` with ``layer-N`` resolved to the graph's layers (``layer-1``: the last); one error line for a layer
    the graph does not have."""
    layers = [s.layer for s in sites]
    out = set()
    for name in bits.a8:
        if name.startswith("layer"):
            index = int(name.removeprefix("layer"))
            if index < 0 and -index <= len(layers):
                index = layers[index]
            if index not in layers:
                raise WsvdError(f"8-bit exception {name} names a layer the model does not have (layers {layers[0]} to "
                                f"{layers[-1]}; layer-1 is the last)")
            name = f"layer{index}"
        out.add(name)
    return out


def _latent_groups(sites: list[AttentionSite]) -> dict[Node, int]:
    """Up-projection node -> latent width per head, for per-head factors (from the recorded layout)."""
    groups = {}
    for site in sites:
        for proj in (site.q_proj, site.k_proj, site.v_proj):
            if proj.factored and proj.up is not None:
                spec = factor_spec(proj.node)
                if spec.per_head and spec.blocks > 1:
                    groups[proj.node] = spec.width
    return groups

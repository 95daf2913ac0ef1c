"""Fake-quant pass: identity at 16 bits, error shrinking with bits, latents per token per head."""

import copy

import pytest
import torch
from conftest import tiny_forward

from wsvd_passes.algorithms.quantize import fake_quant_activation, parse_bits
from wsvd_passes.compression.compress import calibrate, factor_plan
from wsvd_passes.compression.recipes import RECIPES
from wsvd_passes.errors import WsvdError
from wsvd_passes.graph.graph_utils import infer_val
from wsvd_passes.graph.pipeline import Pipeline
from wsvd_passes.graph.quant_spec import quant_spec, quantized_linears
from wsvd_passes.graph.sites import find_sites
from wsvd_passes.passes.factorize import FactorizeQKV
from wsvd_passes.passes.fake_quant import FakeQuantize
from wsvd_passes.passes.rotate import OnlineHadamard, RotateResidual, RotateValueHeads, fixed_rotation


def _compressed(bits, rotate=True):
    reference = tiny_forward("tiny-llama-gqa")
    recipe = RECIPES["wsvd-noft"]
    calib = calibrate(reference, torch.randint(0, 384, (4, 40)), [recipe], progress=False)
    plan, _ = factor_plan(calib, recipe, 0.7)
    graph = copy.deepcopy(reference)
    rotations = [RotateResidual(), RotateValueHeads(), OnlineHadamard()] if rotate else []
    Pipeline([FactorizeQKV(plan), *rotations, FakeQuantize(parse_bits(bits))])(graph)
    return graph


def test_sixteen_bits_is_the_identity():
    reference = copy.deepcopy(tiny_forward("tiny-llama"))
    code = reference.gm.code
    Pipeline([FakeQuantize(parse_bits("w16a16"))])(reference)
    assert reference.gm.code == code


def test_error_shrinks_with_bits_and_latents_are_quantised_per_head():
    ids = torch.randint(0, 384, (2, 30))
    with torch.no_grad():
        exact = _compressed("w16a16").gm(input_ids=ids)
        errors = {b: float((_compressed(b).gm(input_ids=ids) - exact).abs().mean()) for b in ("w8a8", "w4a8", "w4a4")}
    assert 0 < errors["w8a8"] < errors["w4a8"] < errors["w4a4"]

    graph = _compressed("w8a8")
    site = find_sites(graph.gm)[0]  # sites are still found through the quantisers
    quantisers = [n for n in graph.gm.graph.nodes if n.target is fake_quant_activation]
    up_inputs = {n.kwargs["group"] for n in quantisers if site.k_proj.node in n.users}
    r_max = graph.gm.get_parameter(site.k_proj.down).shape[0] // site.n_kv_heads
    assert up_inputs == {r_max}
    lm_head = next(n for n in graph.gm.graph.nodes if n.op == "output").all_input_nodes[0]
    assert lm_head.args[0].target is not fake_quant_activation  # the LM head stays in full precision
    assert graph.reexport() is not None


def test_quantiser_nodes_carry_the_shapes_their_op_infers():
    # FakeQuantize sets a quantiser's fake value like its input's instead of running the op on fake tensors:
    # the op's own inference (symbolic batch and sequence dims, per-token and per-head groups) must agree
    graph = _compressed("w8a8")
    quantisers = [n for n in graph.gm.graph.nodes if n.target is fake_quant_activation]
    assert {n.kwargs["group"] is None for n in quantisers} == {True, False}
    for node in quantisers:
        stored = node.meta["val"]
        inferred = infer_val(graph.gm, node).meta["val"]
        assert stored.dtype == inferred.dtype and stored.shape == inferred.shape, node.name
        assert any(isinstance(d, torch.SymInt) for d in stored.shape)  # symbolic dims kept


def test_quantised_weights_are_exact_integer_codes_times_the_recorded_scale():
    graph = _compressed("w4a8")
    specs = {n: quant_spec(n) for n in quantized_linears(graph.gm)}
    lm_head = next(n for n in graph.gm.graph.nodes if n.op == "output").all_input_nodes[0]
    assert specs and lm_head not in specs
    assert all(not fixed_rotation(n.args[1].target) for n in specs)
    for node, spec in specs.items():
        W = graph.gm.get_parameter(node.args[1].target)
        scale = graph.gm.get_buffer(spec.scale)
        codes = torch.round(W / scale[:, None])
        assert (spec.weight_bits, spec.activation_bits) == (4, 8)
        assert codes.abs().max() <= 7 and torch.equal(codes * scale[:, None], W)
        assert node.args[0].target is fake_quant_activation and node.args[0].kwargs["group"] == spec.activation_group


def test_vlm_input_rotation_is_not_quantised():
    from wsvd_passes.compression.compress import compress
    from wsvd_passes.graph.residual import INPUT_ROTATION

    graph, _ = compress(tiny_forward("tiny-llava"), None, RECIPES["quarot"], None, parse_bits("w4a4"))
    rotation = next(n for n in graph.gm.graph.nodes if n.target is torch.ops.aten.linear.default
                    and n.args[1].target == INPUT_ROTATION)
    assert quant_spec(rotation) is None and rotation.args[0].op == "placeholder"
    assert quantized_linears(graph.gm)


def test_eight_bit_exceptions_keep_exactly_the_named_inputs_and_the_clip_reaches_the_others():
    graph = _compressed("w4a4c0.9+down_proj+latent+layer-1")
    last = find_sites(graph.gm)[-1].layer
    roles = set()
    for node in quantized_linears(graph.gm):
        spec, x = quant_spec(node), node.args[0]
        layer, kind = spec.role.split(".")
        roles.add(kind)
        kept = kind in ("down_proj", "latent") or layer == f"layer{last}"
        assert x.target is fake_quant_activation and x.args[1] == spec.activation_bits == (8 if kept else 4), spec.role
        assert x.kwargs.get("clip") == (None if kept else 0.9), spec.role
    assert roles == {"qkv", "o_proj", "gate_up", "down_proj", "latent"}


def test_an_exception_for_a_layer_the_model_lacks_gives_one_line():
    graph = copy.deepcopy(tiny_forward("tiny-llama-gqa"))
    with pytest.raises(WsvdError) as info:
        Pipeline([FakeQuantize(parse_bits("w4a4+layer-3"))])(graph)
    assert "layer-3 names a layer the model does not have (layers 0 to 1" in str(info.value)
    assert "\n" not in str(info.value)

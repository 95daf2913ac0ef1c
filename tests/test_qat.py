"""Learnable S2 and local QAT: S2 stays orthogonal, the Fisher is measured in the rotated basis,
QAT lowers the deployment-quantised objective, and the `wsvd` recipe runs end to end."""

import copy

import pytest
import torch
from conftest import tiny_forward
from hypothesis import given, settings
from hypothesis import strategies as st

from wsvd_passes.algorithms.quantize import fake_quant_activation, parse_bits
from wsvd_passes.compression.calibration import collect_gradients
from wsvd_passes.compression.compress import calibrate, compress, factor_plan
from wsvd_passes.compression.recipes import RECIPES
from wsvd_passes.errors import WsvdError
from wsvd_passes.graph.pipeline import Pipeline, same_function
from wsvd_passes.graph.sites import find_sites
from wsvd_passes.passes.factorize import FactorizeQKV
from wsvd_passes.passes.fake_quant import FakeQuantize
from wsvd_passes.passes.qat import LocalQAT, RotatedTargets, local_qat, quantized_product, random_rotations
from wsvd_passes.passes.rotate import qkv_bases, rotation_passes

WINDOWS = torch.randint(0, 384, (4, 33), generator=torch.Generator().manual_seed(7))


@settings(max_examples=12)
@given(n=st.integers(1, 3), d=st.sampled_from([5, 8]), r=st.integers(1, 7), E=st.sampled_from([9, 16]),
       bits=st.sampled_from([4, 8, 16]), seed=st.integers(0, 1000), data=st.data())
def test_s2_stays_orthogonal_and_the_rotation_is_folded_exactly(n, d, r, E, bits, seed, data):
    ranks = data.draw(st.lists(st.integers(1, r), min_size=n, max_size=n))  # heads padded to the largest rank r
    g = torch.Generator().manual_seed(seed)
    keep = torch.arange(r) < torch.tensor(ranks)[:, None]  # [n, r] real latent channels
    W, F = torch.randn(n, d, E, generator=g), torch.rand(n, d, E, generator=g) + 0.1
    up = torch.randn(n, d, r, generator=g) * keep[:, None, :]
    down = torch.randn(n, r, E, generator=g) * keep[:, :, None]
    start = torch.eye(r).repeat(n, 1, 1)
    for h, rank in enumerate(ranks):
        start[h, :rank, :rank] = random_rotations(1, rank, g)[0].float()
    a, b, S2, losses = local_qat(W, F, up, down, bits, steps=6, lr=1e-3, s2_lr=0.2, start=start, ranks=ranks)
    torch.testing.assert_close(S2.transpose(-1, -2) @ S2, torch.eye(r).expand(n, r, r), atol=2e-6, rtol=0)
    block = keep[:, :, None] & keep[:, None, :]
    assert torch.equal(S2[~block], start[~block])  # identity on the padding, untouched
    assert not a[~keep[:, None, :].expand_as(a)].any() and not b[~keep[:, :, None].expand_as(b)].any()
    if max(ranks) > 1:
        assert not torch.allclose(S2, start, atol=1e-4)  # S2 was trained, not frozen
    # zero steps: the factors are only rotated, so their product is unchanged
    a0, b0, S20, _ = local_qat(W, F, up, down, bits, steps=0, start=start, ranks=ranks)
    torch.testing.assert_close(S20, start)
    torch.testing.assert_close(a0 @ b0, up @ down, atol=1e-4, rtol=1e-4)
    assert losses["loss_before"] > 0


@settings(max_examples=8, deadline=None)
@given(ranks=st.lists(st.integers(1, 7), min_size=2, max_size=4), pad=st.integers(0, 3),
       bits=st.sampled_from([4, 8]), seed=st.integers(0, 1000))
def test_each_head_trains_in_a_padded_batch_as_it_would_alone(ranks, pad, bits, seed):
    """LocalQAT trains q, k and v of a layer as one batch padded to their largest rank: every head must come out
    as when it trains alone at its own rank (the objective is a sum over heads, Adam acts per element). S2 itself
    is not compared: its gradient is near zero (exactly zero at 16 bits, where U S2^T S2 D = U D), so Adam's
    normalisation turns rounding differences of the padded matmuls into different rotations; the trained products
    and objectives are what must agree."""
    g = torch.Generator().manual_seed(seed)
    d, E, r = 6, 20, max(ranks) + pad
    keep = torch.arange(r) < torch.tensor(ranks)[:, None]
    W, F = torch.randn(len(ranks), d, E, generator=g), torch.rand(len(ranks), d, E, generator=g) + 0.1
    up = torch.randn(len(ranks), d, r, generator=g) * keep[:, None, :]
    down = torch.randn(len(ranks), r, E, generator=g) * keep[:, :, None]
    start = torch.eye(r).repeat(len(ranks), 1, 1)
    for h, rank in enumerate(ranks):
        start[h, :rank, :rank] = random_rotations(1, rank, g)[0].float()
    a, b, _, losses = local_qat(W, F, up, down, bits, steps=5, lr=1e-3, s2_lr=0.1, start=start, ranks=ranks)
    alone = 0.0
    for h, rank in enumerate(ranks):
        ah, bh, _, lh = local_qat(W[h:h + 1], F[h:h + 1], up[h:h + 1, :, :rank], down[h:h + 1, :rank], bits, steps=5,
                                  lr=1e-3, s2_lr=0.1, start=start[h:h + 1, :rank, :rank])
        product = ah[0] @ bh[0]
        assert (a[h, :, :rank] @ b[h, :rank] - product).abs().max() <= 1e-3 * product.abs().max()
        alone += lh["loss_after"]
    assert losses["loss_after"] == pytest.approx(alone, rel=1e-2)


def test_qat_lowers_the_quantised_objective():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 16, 48, generator=g)
    F = torch.rand(3, 16, 48, generator=g)
    U, S, Vh = torch.linalg.svd(W)
    up, down = U[..., :11] * S[:, None, :11], Vh[:, :11]
    *_, losses = local_qat(W, F, up, down, 4, steps=40, lr=1e-3, s2_lr=1e-2)
    assert losses["loss_after"] < 0.97 * losses["loss_before"]
    # the product used in training is the deployment quantiser's (value), not a differentiable stand-in
    from wsvd_passes.algorithms.quantize import fake_quant_weight, search_weight_clip

    deployed = [fake_quant_weight(m.reshape(-1, m.shape[-1]), 4, clip_ratio=search_weight_clip(
        m.reshape(-1, m.shape[-1]), 4)).reshape(m.shape) for m in (up, down)]
    torch.testing.assert_close(quantized_product(up, down, 4), deployed[0] @ deployed[1])


def test_qat_targets_equal_those_measured_on_a_rotated_copy():
    """W' and F' of RotatedTargets (mapped from the dense per-sample gradients) against autograd on a rotated copy of
    the model (the reference: gradients taken where the factors live), for q, k and GQA v of every layer."""
    captured = copy.deepcopy(tiny_forward("tiny-llama-gqa"))  # the shared capture stays untouched
    with torch.no_grad():  # gains away from one, so that diag(1/gamma) matters
        for name, param in captured.gm.named_parameters():
            if name.endswith("layernorm.weight"):
                param.copy_(torch.linspace(0.5, 2.0, param.numel()))
    samples = list(WINDOWS[:3])
    sites = find_sites(captured.gm)
    mapped = RotatedTargets(qkv_bases(captured.gm, sites))
    names = {getattr(s, f"{p}_proj").weight: (s.layer, p) for s in sites for p in ("q", "k", "v")}
    collect_gradients(captured, samples, list(names), progress=False,
                      on_sample=lambda grads: mapped({names[t]: g for t, g in grads.items()}))
    targets = mapped.targets({key: captured.gm.get_parameter(t) for t, key in names.items()})

    rotated = captured.sharing_parameters()
    Pipeline(rotation_passes())(rotated)
    rotated_names = {getattr(s, f"{p}_proj").weight: (s.layer, p) for s in find_sites(rotated.gm) for p in ("q", "k", "v")}
    fisher = collect_gradients(rotated, samples, list(rotated_names), progress=False)
    assert set(targets) == set(rotated_names.values())
    for t, key in rotated_names.items():
        torch.testing.assert_close(targets[key].weight, rotated.gm.get_parameter(t).detach().float(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(targets[key].fisher, fisher[t], rtol=1e-3, atol=1e-4 * float(fisher[t].max()))


def test_qat_targets_need_the_unrotated_dense_graph():
    captured = copy.deepcopy(tiny_forward("tiny-llama-gqa"))
    rotated = captured.sharing_parameters()
    Pipeline(rotation_passes())(rotated)
    with pytest.raises(WsvdError, match="already rotated"):
        qkv_bases(rotated.gm, find_sites(rotated.gm))
    with torch.no_grad():
        captured.gm.get_parameter(next(n for n, _ in captured.gm.named_parameters() if n.endswith("input_layernorm.weight")))[3] = 0
    with pytest.raises(WsvdError, match="zero entries"):
        qkv_bases(captured.gm, find_sites(captured.gm))


@pytest.fixture(scope="module")
def wsvd_calibration():
    reference = tiny_forward("tiny-llama-gqa")
    recipes = [RECIPES["wsvd"], RECIPES["wsvd-noqat"], RECIPES["qsvd"]]
    return reference, calibrate(reference, WINDOWS, recipes, progress=False)


def test_qat_pass_without_steps_or_bits_keeps_the_function(wsvd_calibration):
    reference, calib = wsvd_calibration
    plan, _ = factor_plan(calib, RECIPES["wsvd"], 0.6)
    rotated, trained = copy.deepcopy(reference), copy.deepcopy(reference)
    Pipeline([FactorizeQKV(plan), *rotation_passes()])(rotated)
    Pipeline([FactorizeQKV(plan), *rotation_passes(), LocalQAT(calib.qat_targets, 16, steps=0)])(trained)
    site, before = find_sites(trained.gm)[0], find_sites(rotated.gm)[0]
    assert not torch.equal(trained.gm.get_parameter(site.k_proj.down), rotated.gm.get_parameter(before.k_proj.down))
    same_function(trained.gm, rotated.gm, [{"input_ids": WINDOWS[:2, :17]}], atol=2e-5)


def test_wsvd_recipe_end_to_end(wsvd_calibration):
    reference, calib = wsvd_calibration
    bits = parse_bits("w4a4")
    qat, report = compress(reference, calib, RECIPES["wsvd"], 0.6, bits)
    noqat, _ = compress(reference, calib, RECIPES["wsvd-noqat"], 0.6, bits)
    assert report.qat["heads"] == sum(s.n_heads + 2 * s.n_kv_heads for s in find_sites(reference.gm))
    assert report.qat["loss_after"] < report.qat["loss_before"]
    site = find_sites(qat.gm)[0]  # still per-head factors, latents quantised per token per head
    groups = {n.kwargs["group"] for n in qat.gm.graph.nodes if n.target is fake_quant_activation and site.k_proj.node in n.users}
    assert groups == {qat.gm.get_parameter(site.k_proj.down).shape[0] // site.n_kv_heads}
    ids = WINDOWS[:2]
    with torch.no_grad():
        for graph in (qat, noqat):
            assert torch.isfinite(graph.gm(input_ids=ids)).all()
    assert qat.reexport() is not None


def test_qat_refuses_joint_factors(wsvd_calibration):
    reference, calib = wsvd_calibration
    plan, _ = factor_plan(calib, RECIPES["qsvd"], 0.6)
    graph = copy.deepcopy(reference)
    with pytest.raises(WsvdError, match="per-head factors"):
        Pipeline([FactorizeQKV(plan), *rotation_passes(), LocalQAT(calib.qat_targets, 8, steps=1),
                  FakeQuantize(parse_bits("w8a8"))])(graph)


def test_beta_is_tuned_on_calibration_windows(wsvd_calibration):
    from wsvd_passes.compression.compress import BETA_GRID, tune_beta

    reference, calib = wsvd_calibration
    tuned, losses = tune_beta(reference, calib, RECIPES["qsvd"], 0.6, parse_bits("w4a4"), windows=2)
    assert set(losses) == set(BETA_GRID) and tuned.beta == min(losses, key=losses.get)
    assert len(set(losses.values())) > 1  # beta matters once the factors are quantised
    assert tuned.name == "qsvd" and tuned.granularity == "joint"

"""Fake quantisation against torchao's affine primitives, clip search, STE through torch.export, bit settings."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, dequantize_affine, quantize_affine

from wsvd_passes.algorithms.quantize import (
    Bits,
    fake_quant_activation,
    fake_quant_weight,
    parse_bits,
    quantize_activation,
    search_weight_clip,
    ste,
)
from wsvd_passes.errors import WsvdError


def _randn(seed, *shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * torch.rand(*shape[:-1], 1, generator=g, dtype=dtype) * 10


def _torchao_fake_quant(x, bits, block_size):
    # Our range is the symmetric [-qmax, qmax] with scale = max|x| / qmax. torchao's SYMMETRIC scale is
    # max|x| / ((quant_max - quant_min) / 2): with its default int8 range [-128, 127] that is max|x| / 127.5,
    # so +max|x| rounds to 128 and clamps to 127 while -max|x| reaches -128. Passing quant_min=-qmax,
    # quant_max=qmax makes its scale max|x| / qmax and its zero point 0, i.e. our convention.
    qmax = 2 ** (bits - 1) - 1
    scale, zero = choose_qparams_affine(x, MappingType.SYMMETRIC, block_size, torch.int8, -qmax, qmax)
    q = quantize_affine(x, block_size, scale, zero, torch.int8, -qmax, qmax)
    return dequantize_affine(q, block_size, scale, zero, torch.int8, -qmax, qmax, output_dtype=x.dtype)


def _sq_err(w, q):
    return (w - q).square().sum(-1)


odd = st.integers(0, 20).map(lambda n: 2 * n + 1)
# A reduced width of at least 3: with a block of one element on every dim torchao's choose_qparams_affine
# has no dim to reduce, and amin/amax over dims=[] reduce the whole tensor to one scale.
odd_width = st.integers(1, 20).map(lambda n: 2 * n + 1)


@settings(max_examples=25)
@given(seed=st.integers(0, 10**6), out=odd, width=odd_width, bits=st.sampled_from([4, 8]))
def test_weight_matches_torchao_per_row(seed, out, width, bits):
    w = _randn(seed, out, width)
    assert torch.equal(fake_quant_weight(w, bits), _torchao_fake_quant(w, bits, (1, width)))


@settings(max_examples=25)
@given(seed=st.integers(0, 10**6), lead=st.lists(odd, min_size=1, max_size=3), width=odd_width,
       bits=st.sampled_from([4, 8]))
def test_activation_matches_torchao_per_token(seed, lead, width, bits):
    x = _randn(seed, *lead, width)
    expected = _torchao_fake_quant(x, bits, (1,) * len(lead) + (width,))
    assert torch.equal(fake_quant_activation(x, bits), expected)


@settings(max_examples=15)
@given(seed=st.integers(0, 10**6), heads=st.integers(1, 5), r=odd_width, bits=st.sampled_from([4, 8]))
def test_grouped_activation_matches_torchao_and_maps_each_group_max_to_qmax(seed, heads, r, bits):
    x = _randn(seed, 3, 5, heads * r)
    got = fake_quant_activation(x, bits, group=r)
    assert torch.equal(got, _torchao_fake_quant(x, bits, (1, 1, r)))
    qmax = 2 ** (bits - 1) - 1
    absmax = x.unflatten(-1, (heads, r)).abs().amax(-1, keepdim=True)
    codes = got.unflatten(-1, (heads, r)) / (absmax / qmax)
    torch.testing.assert_close(codes.abs().amax(-1), torch.full((3, 5, heads), float(qmax)))
    for h in range(heads):
        torch.testing.assert_close(got[..., h * r:(h + 1) * r], fake_quant_activation(x[..., h * r:(h + 1) * r], bits))


def test_group_must_divide_width():
    with pytest.raises(WsvdError, match="does not divide"):
        fake_quant_activation(torch.randn(2, 10), 4, group=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_is_kept_and_half_precision_is_quantised_in_float32(dtype):
    w = torch.randn(7, 33).to(dtype)
    for fq in (fake_quant_weight(w, 4), fake_quant_activation(w, 4), fake_quant_activation(w, 8, group=11)):
        assert fq.dtype == dtype
    if dtype == torch.bfloat16:
        assert torch.equal(fake_quant_weight(w, 8), fake_quant_weight(w.float(), 8).bfloat16())


@pytest.mark.parametrize("bits", [16, 32])
def test_bits_16_or_more_is_the_identity(bits):
    w = torch.randn(5, 9, dtype=torch.float64)
    for fq in (fake_quant_weight(w, bits, clip_ratio=0.5), fake_quant_weight(w, bits, ste=True),
               fake_quant_activation(w, bits), fake_quant_activation(w, bits, group=3, ste=True)):
        assert torch.equal(fq, w)
    assert torch.equal(search_weight_clip(w, bits), torch.ones(5, dtype=torch.float64))


def test_zero_tokens_and_rows_quantise_to_zero():
    x = torch.randn(4, 8)
    x[1] = 0
    for fq in (fake_quant_activation(x, 4), fake_quant_weight(x, 4), fake_quant_activation(x, 4, group=2)):
        assert torch.isfinite(fq).all() and torch.equal(fq[1], torch.zeros(8))


@settings(max_examples=20)
@given(seed=st.integers(0, 10**6), out=st.integers(1, 8), width=st.integers(16, 200))
def test_error_shrinks_with_bits(seed, out, width):
    w = _randn(seed, out, width, dtype=torch.float64)
    for fq in (fake_quant_weight, fake_quant_activation):
        errors = [_sq_err(w, fq(w, bits)).sum() for bits in (2, 4, 8)]
        assert errors[0] > errors[1] > errors[2] > 0


@settings(max_examples=15)
@given(seed=st.integers(0, 10**6), out=st.integers(1, 8), width=st.integers(1, 100), bits=st.sampled_from([3, 4, 8]))
def test_clip_search_never_increases_the_error(seed, out, width, bits):
    w = _randn(seed, out, width)
    ratio = search_weight_clip(w, bits, grid=20)
    assert ratio.shape == (out,) and bool(((ratio >= 0.8) & (ratio <= 1)).all())
    assert (_sq_err(w, fake_quant_weight(w, bits, clip_ratio=ratio)) <= _sq_err(w, fake_quant_weight(w, bits))).all()


def _assert_definitions_ratios(w, bits, grid=100, min_ratio=0.8):
    """The search's ratios against the grid evaluated ratio by ratio with fake_quant_weight: the same ratio
    on every row whose best ratio wins by more than float rounding (1e-5 relative), else a tied one."""
    ratios = torch.linspace(1.0, min_ratio, grid, dtype=w.dtype)
    errors = torch.stack([_sq_err(w, fake_quant_weight(w, bits, clip_ratio=torch.full((w.shape[0],), float(r), dtype=w.dtype)))
                          for r in ratios])  # [grid, out]
    best = errors.min(0).values
    chosen = search_weight_clip(w, bits, grid=grid, min_ratio=min_ratio)
    at_chosen = errors.gather(0, (ratios[:, None] == chosen).float().argmax(0, keepdim=True))[0]
    assert (at_chosen <= best * (1 + 1e-5)).all()
    clear = (errors <= best * (1 + 1e-5)).sum(0) == 1  # rows with one clear winner
    assert torch.equal(chosen[clear], ratios[errors.argmin(0)][clear])
    return clear


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(37, 91), (300, 577), (5, 1)])
def test_fused_clip_search_chooses_the_definitions_ratios(shape, bits):
    # the compiled all-ratios-at-once search against the plain definition
    torch.manual_seed(shape[0] * 10 + bits)
    w = torch.randn(*shape) * torch.rand(shape[0], 1) * 3  # rows of different scales
    w[0, 0] = 25.0  # an outlier row
    assert _assert_definitions_ratios(w, bits).float().mean() > 0.9
    _assert_definitions_ratios(w.double(), bits, grid=17)


@pytest.mark.slow
def test_fused_clip_search_on_smollm2_weights():
    from wsvd_passes.models.registry import load_model

    model = load_model("smollm2-135m").model
    for name in ("self_attn.q_proj", "mlp.down_proj", "mlp.gate_proj"):
        w = model.get_submodule(f"model.layers.7.{name}").weight.detach()
        for bits in (4, 8):
            assert _assert_definitions_ratios(w, bits).float().mean() > 0.9, (name, bits)


def test_clip_search_keeps_exact_rows_and_clips_outliers():
    # Row 0, all +-1 at 8 bits: ratio 1 is exact (codes +-127); any r < 1 clamps every value to +-r.
    # Row 1, N(0, 1) with one value of 12 at 4 bits: ratio 1 gives a step of 12/7 that rounds most values
    # to 0 (about 0.2 squared error each over 1023 values); ratio 0.8 costs the outlier (2.4)^2 = 5.8 but
    # shrinks the step to 9.6/7, saving far more on the other values.
    signs = torch.randint(0, 2, (1024,)) * 2.0 - 1
    outlier = torch.randn(1024)
    outlier[100] = 12.0
    rows = torch.stack([signs, outlier])
    assert search_weight_clip(rows, 8)[0] == 1.0
    ratio = search_weight_clip(rows, 4)
    assert ratio[0] == 1.0 and ratio[1] < 0.95


def test_clip_ratio_scales_the_row_maximum():
    w = torch.randn(6, 40)
    ratio = torch.linspace(0.5, 1.0, 6)
    fq = fake_quant_weight(w, 4, clip_ratio=ratio)
    torch.testing.assert_close(fq.abs().amax(-1), ratio * w.abs().amax(-1))
    per_row = torch.full((6,), 0.7)
    assert torch.equal(fake_quant_weight(w, 4, clip_ratio=0.7), fake_quant_weight(w, 4, clip_ratio=per_row))
    with pytest.raises(WsvdError, match="outside"):
        fake_quant_weight(w, 4, clip_ratio=1.5)


def test_ste_gradient_is_the_identity():
    w = torch.randn(7, 13, requires_grad=True)
    (grad,) = torch.autograd.grad(fake_quant_weight(w, 4, ste=True).sum(), w)
    assert torch.equal(grad, torch.ones_like(w))
    (grad,) = torch.autograd.grad((fake_quant_activation(w, 4, group=13, ste=True) * w.detach()).sum(), w)
    assert torch.equal(grad, w.detach())
    q = fake_quant_weight(w, 4)
    assert torch.equal(ste(w, q), q)
    (plain,) = torch.autograd.grad(q.sum(), w)
    assert (plain == 0).float().mean() > 0.5  # without STE only the scale (row maximum) carries a gradient


class _QuantLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(6, 10))

    def forward(self, x):
        return fake_quant_activation(x, 8, ste=True) @ fake_quant_weight(self.weight, 4, ste=True).T


@pytest.mark.parametrize("strict", [False, True])
def test_ste_gradient_survives_torch_export(strict):
    # The trap: torchao's QAT fake quantisers round with an autograd.Function that export inlines into
    # aten.round, so the exported module's weight gradient is zero. The detach STE must keep it.
    module, x = _QuantLinear(), torch.randn(3, 4, 10)
    ep = torch.export.export(module, (x,), strict=strict)
    exported = ep.module()
    out = exported(x)
    torch.testing.assert_close(out, module(x))
    (grad,) = torch.autograd.grad(out.sum(), exported.weight)
    expected = fake_quant_activation(x, 8).sum((0, 1)).expand(6, 10)  # identity STE: d sum(a W^T) / dW = 1 a
    torch.testing.assert_close(grad, expected)
    assert grad.abs().min() > 0


@pytest.mark.parametrize("text, bits", [("w8a8", Bits(8, 8)), ("w4a4", Bits(4, 4)), ("w8a4", Bits(8, 4)),
                                        ("w4a8", Bits(4, 8)), ("w16a16", Bits(16, 16)), ("w16", Bits(16, 16))])
def test_parse_bits_accepts(text, bits):
    assert parse_bits(text) == bits


@pytest.mark.parametrize("text", ["", "w8", "a8", "w4a16", "w3a3", "W8A8", "int8", " w8a8"])
def test_parse_bits_rejects_with_the_accepted_values(text):
    with pytest.raises(WsvdError) as info:
        parse_bits(text)
    message = str(info.value)
    assert "\n" not in message and all(v in message for v in ("w8a8", "w4a4", "w8a4", "w4a8", "w16a16", "w16"))


@pytest.mark.parametrize("text, bits", [
    ("w4a4c0.9", Bits(4, 4, activation_clip=0.9)),
    ("w8a4e8c0.85+down_proj+layer-1", Bits(8, 4, 8, 0.85, ("down_proj", "layer-1"))),
    ("w4a4+latent+layer0+qkv", Bits(4, 4, a8=("latent", "layer0", "qkv")))])
def test_low_bit_activation_options_parse_and_name_round_trip(text, bits):
    assert parse_bits(text) == bits and bits.name == text and parse_bits(bits.name) == bits


@pytest.mark.parametrize("text, message", [
    ("w4a4c1", "outside (0, 1)"), ("w4a4c0", "outside (0, 1)"), ("w4a4c0.9.1", "unknown bit setting"),
    ("w4a4+mlp", "unknown 8-bit exception 'mlp'"), ("w4a4+", "unknown 8-bit exception ''"),
    ("w4a4+layerx", "unknown 8-bit exception 'layerx'"), ("w8a8+down_proj", "below 8 bits"),
    ("w4a8c0.9", "below 8 bits"), ("w4a4+qkv+qkv", "twice")])
def test_bad_low_bit_activation_options_give_one_line(text, message):
    with pytest.raises(WsvdError) as info:
        parse_bits(text)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("shape, group, bits, clip", [((3, 5, 13), None, 4, 0.85), ((7, 15), 5, 4, 0.9),
                                                      ((2, 1, 9), 3, 8, 0.7), ((4, 11), None, 3, 1.0)])
def test_clipped_activation_matches_a_float64_reference(shape, group, bits, clip):
    x = _randn(7, *shape, dtype=torch.float64)
    x[..., 0] *= 8  # an outlier per token that the clip saturates
    rows = x if group is None else x.unflatten(-1, (-1, group))
    qmax = 2 ** (bits - 1) - 1
    scale = clip * rows.abs().amax(-1, keepdim=True) / qmax
    want = (torch.clamp(torch.round(rows / scale), -qmax, qmax) * scale).reshape(shape)
    got = fake_quant_activation(x, bits, group=group, clip=clip)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    codes, scales = quantize_activation(x.float(), bits, group=group, clip=clip)
    scales = scales if group else scales[..., None]  # [..., groups]
    deq = (codes.float().unflatten(-1, (scales.shape[-1], -1)) * scales[..., None]).reshape(shape)
    torch.testing.assert_close(deq, fake_quant_activation(x.float(), bits, group=group, clip=clip), rtol=0, atol=0)
    with pytest.raises(WsvdError, match="outside"):
        fake_quant_activation(x, bits, clip=1.5)


def test_too_few_bits_is_rejected():
    with pytest.raises(WsvdError, match="2 or more"):
        fake_quant_weight(torch.randn(2, 3), 1)

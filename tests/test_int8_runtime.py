"""Real int8 execution (lowering/int8.py, wsvd::int8_linear): the op against a float64 reference on awkward
sizes, the rewrite on compressed graphs (full sequence, and the lowered latent decode graph of a reloaded
artifact, compiled) against the fake-quant graph that evaluation scores, what stays simulated, bad input."""

import copy
import functools

import pytest
import torch

import lowering
from conftest import tiny, tiny_forward
from lowering.int8 import lower_int8
from test_deployed_invariant import IDS, STORAGE, WINDOWS
from test_latent_kv import steps
from wsvd_passes import artifact
from wsvd_passes.cli import main
from wsvd_passes.compress import calibrate, compress
from wsvd_passes.generation import generate
from wsvd_passes.latent_kv import LatentKVCache
from wsvd_passes.pipeline import Pipeline
from wsvd_passes.quantize import fake_quant_activation, parse_bits, quantize_weight
from wsvd_passes.recipes import RECIPES

MODEL = "tiny-llama-gqa"
# The int32 sums are exact and the activation codes are the fake quantiser's own, so what differs is float32
# rounding of the scaled sums: measured at most 4e-7 of the largest logit (wsvd, quarot, qsvd W8A8).
TOL = 1e-5


@functools.cache
def _compressed(recipe: str, bits: str = "w8a8"):
    base, r = tiny_forward(MODEL), RECIPES[recipe]
    calib = calibrate(base, WINDOWS, [r], progress=False) if r.factor else None
    return compress(base, calib, r, 0.6 if r.factor else None, parse_bits(bits))


@pytest.mark.parametrize("shape", [(1, 5), (3, 7, 33), (2, 1, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_a_float64_reference(shape, bias):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * torch.linspace(0.1, 3, shape[-1])  # uneven channel ranges
    codes, scale = quantize_weight(torch.randn(19, shape[-1], generator=g), 8)
    b = torch.randn(19, generator=g) if bias else None
    got = torch.ops.wsvd.int8_linear(x, codes, scale, b)
    qx = fake_quant_activation(x.double(), 8)  # the quantiser's values, in float64
    want = qx @ (codes.double() * scale.double()[:, None]).T + (b.double() if bias else 0)
    assert got.shape == (*shape[:-1], 19) and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("recipe, simulated", [("quarot", 0), ("qsvd", 0), ("wsvd", 6)])
def test_w8a8_linears_run_in_integers_and_give_the_evaluated_logits(recipe, simulated):
    compressed, _ = _compressed(recipe)
    with torch.no_grad():
        want = compressed.gm(input_ids=IDS)
    graph = copy.deepcopy(compressed)
    counts = lower_int8(graph)
    # wsvd: the per-head latent up-projections quantise one scale per head and token: they stay simulated
    assert counts == {"int8": 14 if recipe != "qsvd" else 16, "simulated": simulated}
    ops = [n for n in graph.gm.graph.nodes if n.target is torch.ops.wsvd.int8_linear.default]
    assert len(ops) == counts["int8"] and all(graph.gm.get_buffer(n.args[1].target).dtype == torch.int8 for n in ops)
    assert not any(n.args[1].target in dict(graph.gm.named_parameters()) for n in ops)  # float weights dropped
    with torch.no_grad():
        got = graph.gm(input_ids=IDS)
    assert (got - want).abs().max() <= TOL * want.abs().max()


def test_lowered_int8_decode_of_a_reloaded_artifact_reproduces_the_evaluated_graph(tmp_path):
    compressed, report = _compressed("wsvd")
    r, bits = RECIPES["wsvd"], parse_bits("w8a8")
    artifact.save(tmp_path, model=MODEL, base=tiny_forward(MODEL), compressed=compressed, recipe=r, bits=bits,
                  rho1_target=0.6, report=report, calibration={}, environment={}, save_dtype=STORAGE)
    with torch.no_grad():
        evaluated = compressed.gm(input_ids=IDS)
    decoder = artifact.load(tmp_path, decode=True, max_cache_len=IDS.shape[1], model=tiny(MODEL)).captured
    Pipeline([LatentKVCache(decoder.config)])(decoder)
    lowering.lower(decoder)
    counts = lower_int8(decoder)
    assert counts["int8"] > 0
    got = steps(decoder, IDS)
    assert (got - evaluated).abs().max() <= TOL * evaluated.abs().max()
    eager = generate(decoder, IDS[:1, :5], 6)
    assert torch.equal(generate(decoder, IDS[:1, :5], 6, step=lowering.compile_step(decoder)), eager)


def test_runtime_int8_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["compress", "--model", MODEL, "--recipe", "quarot", "--rho1", "1", "--bits", "w8a8", "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    result = main(["generate", "--artifact", str(out), "--prompt", "def f(x):", "--max-new-tokens", "3",
                   "--runtime", "int8", "--no-compile"])
    assert result == 0 and "14 W8A8 linears in int8 (torch._int_mm), 0 simulated" in capsys.readouterr().out
    w4 = tmp_path / "w4"
    assert main(["compress", "--model", MODEL, "--recipe", "quarot", "--rho1", "1", "--bits", "w4a4", "--quiet", "--out", str(w4)]) == 0
    capsys.readouterr()
    assert main(["eval", "--artifact", str(w4), "--max-windows", "1", "--runtime", "int8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --runtime int8") and "w4a4" in err and err.count("\n") == 1

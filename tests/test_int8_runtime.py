"""Real int8 execution (lowering/int8.py): int8_linear against a float64 reference on awkward
sizes, the rewrite on compressed graphs (full sequence, and the lowered latent decode graph of a reloaded
artifact, compiled) against the fake-quant graph that evaluation scores, what stays simulated, bad input."""

import copy
import functools

import pytest
import torch
from conftest import tiny, tiny_forward
from test_deployed_invariant import IDS, STORAGE, WINDOWS
from test_latent_kv import steps

import lowering
from lowering.int8 import int8_embedding, int8_linear, lower_int8
from wsvd_passes.algorithms.quantize import fake_quant_activation, parse_bits, quantize_weight
from wsvd_passes.artifacts import artifact
from wsvd_passes.cli import main
from wsvd_passes.compression.compress import calibrate, compress
from wsvd_passes.compression.recipes import RECIPES
from wsvd_passes.eval.generation import generate
from wsvd_passes.graph.pipeline import Pipeline
from wsvd_passes.passes.latent_kv import LatentKVCache

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
    got = int8_linear(x, codes, scale, b)
    qx = fake_quant_activation(x.double(), 8)  # the quantiser's values, in float64
    want = qx @ (codes.double() * scale.double()[:, None]).T + (b.double() if bias else 0)
    assert got.shape == (*shape[:-1], 19) and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("group", [None, 32])
def test_compiled_int8_linear_equals_eager_at_one_token(group):
    """Regression: inductor views a one-token operand with row stride 0 and the CPU torch._int_mm sums it wrong
    (pytorch/pytorch#195066): per-token and per-head (block-diagonal) quantised inputs."""
    g = torch.Generator().manual_seed(2)
    w = torch.block_diag(*[torch.randn(40, 32, generator=g) for _ in range(3)])
    x, (codes, scale) = torch.randn(1, 1, 96, generator=g), quantize_weight(w, 8)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(int8_linear)(x, codes, scale, None, group), int8_linear(x, codes, scale, None, group))


def test_int8_embedding_is_the_dequantised_lookup():
    codes, scale = quantize_weight(torch.randn(19, 33, generator=torch.Generator().manual_seed(1)), 8)
    ids = torch.randint(0, 19, (3, 7))
    assert torch.equal(int8_embedding(codes, scale, ids),
                       torch.nn.functional.embedding(ids, codes.float() * scale[:, None]))


@pytest.mark.parametrize("blocks, group, rows", [(3, 5, 7), (1, 9, 4), (4, 3, 1)])
def test_grouped_int8_linear_of_a_block_diagonal_weight_matches_a_float64_reference(blocks, group, rows):
    """One activation scale per token and head, a per-head (block-diagonal) up-projection: each output block
    scaled by its head's activation scale after the integer matmul."""
    g = torch.Generator().manual_seed(blocks * group)
    x = torch.randn(2, 3, blocks * group, generator=g) * torch.linspace(0.1, 4, blocks * group)  # heads of unlike ranges
    w = torch.block_diag(*[torch.randn(rows, group, generator=g) for _ in range(blocks)])
    codes, scale = quantize_weight(w, 8)
    b = torch.randn(blocks * rows, generator=g)
    got = int8_linear(x, codes, scale, b, group)
    qx = fake_quant_activation(x.double(), 8, group=group)
    want = qx @ (codes.double() * scale.double()[:, None]).T + b.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    if blocks > 1:  # per-token scales would be a different function: the test can tell them apart
        assert (fake_quant_activation(x.double(), 8) - qx).abs().max() > 1e-3


@pytest.mark.parametrize("recipe, bits", [("quarot", "w8a8"), ("qsvd", "w8a8"), ("wsvd", "w8a8"), ("quarot", "w8a8e8")])
def test_w8a8_linears_run_in_integers_and_give_the_evaluated_logits(recipe, bits):
    compressed, _ = _compressed(recipe, bits)
    with torch.no_grad():
        want = compressed.gm(input_ids=IDS)
    graph = copy.deepcopy(compressed)
    counts = lower_int8(graph)
    # wsvd: the 6 per-head latent up-projections (one activation scale per head and token) run in integers too
    e8 = int(bits.endswith("e8"))  # the 8-bit embedding lookup, and the LM head as one more W8A8 linear
    linears = {"quarot": 14, "qsvd": 16, "wsvd": 20}[recipe] + e8
    assert counts == {"int8": linears, "int8_embedding": e8, "simulated": 0}
    ops = [n for n in graph.gm.graph.nodes if n.target is int8_linear]
    assert len(ops) == counts["int8"] and all(graph.gm.get_buffer(n.args[1].target).dtype == torch.int8 for n in ops)
    assert not any(n.args[1].target in dict(graph.gm.named_parameters()) for n in ops)  # float weights dropped
    with torch.no_grad():
        got = graph.gm(input_ids=IDS)
    assert (got - want).abs().max() <= TOL * want.abs().max()


def test_lowered_int8_decode_of_a_reloaded_artifact_reproduces_the_evaluated_graph(tmp_path):
    compressed, report = _compressed("wsvd")
    r, bits = RECIPES["wsvd"], parse_bits("w8a8")
    artifact.save(tmp_path, model=MODEL, base=artifact.dense(tiny_forward(MODEL)), compressed=compressed,
                  recipe=r, bits=bits,
                  rho1_target=0.6, report=report, calibration={}, environment={}, save_dtype=STORAGE)
    with torch.no_grad():
        evaluated = compressed.gm(input_ids=IDS)
    decoder = artifact.load(tmp_path, decode=True, max_cache_len=IDS.shape[1], model=tiny(MODEL)).captured
    Pipeline([LatentKVCache(decoder.config)])(decoder)
    lowering.lower(decoder)
    counts = lower_int8(decoder)
    # the full graph's 14 W8A8 linears, o_proj behind the per-head value up-projection included, and Q's
    # per-head up-projections (one scale per head and token); K's and V's live in the op and the cache
    assert counts == {"int8": 16, "int8_embedding": 0, "simulated": 0}
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


def test_bench_model_measures_every_variant_in_one_run(tmp_path, capsys):
    """`wsvd bench model`: dense fp32/bf16, fake-quant and int8 decode of an artifact (untimed-quality check: int8 decodes
    like fake-quant from an empty cache, to float32 rounding), with held bytes and ratios, as JSON."""
    compressed, report = _compressed("wsvd", "w8a8e8")
    r, bits = RECIPES["wsvd"], parse_bits("w8a8e8")
    art = tmp_path / "art"
    artifact.save(art, model=MODEL, base=artifact.dense(tiny_forward(MODEL)), compressed=compressed,
                  recipe=r, bits=bits, rho1_target=0.6, report=report, calibration={}, environment={})
    out = tmp_path / "bench.json"
    assert main(["bench", "model", "--artifact", str(art), "--batch", "2", "--cache-len", "12", "--steps", "2",
                 "--rounds", "3", "--no-compile", "--quiet", "--json", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert result["artifact_bytes"] == (art / "weights.safetensors").stat().st_size
    assert [(row["batch"], row["cache_len"]) for row in result["runs"]] == [(2, 12)]
    for row in result["runs"]:
        v = row["variants"]
        assert list(v) == ["dense-fp32", "dense-bf16", "fake-quant", "int8"]
        assert all(e["tokens_per_s"] > 0 and e["memory"]["kv_cache"] > 0 for e in v.values())
        for e in v.values():  # interleaved rounds: the median of each, the paired ratio's median inside its range
            assert len(e["tokens_per_s_rounds"]) == 3 and e["tokens_per_s"] == sorted(e["tokens_per_s_rounds"])[1]
            low, high = e["speed_vs_dense_fp32_range"]
            assert low <= e["speed_vs_dense_fp32"] <= high
        assert v["dense-fp32"]["speed_vs_dense_fp32_range"] == [1.0, 1.0]
        assert v["int8"]["check"]["passed"] and v["int8"]["check"]["tolerance"] == 1e-4  # eager: no rounding floor
        assert v["fake-quant"]["compiled_vs_eager"]["rel_err"] == v["int8"]["compiled_vs_eager"]["rel_err"] == 0
        assert v["dense-bf16"]["check"]["rel_err"] < 0.1
        assert v["int8"]["memory"]["weights"] < v["fake-quant"]["memory"]["weights"]  # int8 codes, not float32
        assert v["dense-bf16"]["memory"]["kv_cache"] * 2 == v["dense-fp32"]["memory"]["kv_cache"]
    assert "x the fp16 model" in capsys.readouterr().out
    assert main(["bench", "model", "--batch", "1"]) == 2
    assert "give --artifact DIR" in capsys.readouterr().err
    assert main(["bench", "model", "--artifact", str(art), "--rounds", "0"]) == 2
    assert capsys.readouterr().err == "error: --rounds must be at least 1, got 0\n"

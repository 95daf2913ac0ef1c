"""What is evaluated is what is deployed: for each recipe and bit setting, the full-sequence compressed graph
(what `wsvd eval` scores), the reloaded artifact's decode graph, its latent-KV rewrite and the lowered graph
(int8 latent caches for latents quantised to 8 bits or fewer) give the same logits at every step of a
teacher-forced 16-token sequence."""

import copy
import functools

import pytest
import torch
from conftest import tiny, tiny_forward
from test_latent_kv import steps

import lowering
from wsvd_passes.algorithms.quantize import fake_quant_activation, parse_bits
from wsvd_passes.artifacts import artifact
from wsvd_passes.compression.compress import calibrate, compress
from wsvd_passes.compression.recipes import RECIPES
from wsvd_passes.eval.generation import cache_buffers
from wsvd_passes.graph.pipeline import Pipeline
from wsvd_passes.passes.latent_kv import LatentKVCache

MODEL = "tiny-llama-gqa"
WINDOWS = torch.randint(0, 384, (4, 33), generator=torch.Generator().manual_seed(3))
IDS = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(5))
QUANTISED = ["w16a16", "w8a8", "w4a4", "w8a4", "w4a4e8"]
# The default run covers every recipe kind and bit setting; `pytest -m slow` the rest of the matrix.
FAST = {("qsvd", "w8a8"), ("qsvd", "w4a4"), ("wsvd-noqat", "w8a4"), ("wsvd", "w8a8"), ("wsvd", "w4a4e8")}
CASES = ([("svd-llm", "w16a16"), ("qsvd-noq", "w16a16"), ("wsvd-noq", "w16a16"), ("quarot", "w8a8")]
         + [pytest.param(r, b, marks=() if (r, b) in FAST else pytest.mark.slow)
            for r in ("qsvd", "wsvd-noqat", "wsvd") for b in QUANTISED] + [pytest.param("quarot", "w4a4", marks=pytest.mark.slow)]
         + [pytest.param("wsvd-noqat", "w4a4c0.9+down_proj+layer-1", marks=pytest.mark.slow)])  # clipped int8 latents
# float32 graphs: what differs between them is the order of float operations (one token at a time vs the whole
# sequence, the K rebuild, int8 codes times scales), so the logits agree to float32 rounding: measured at most
# 7e-7 of the largest logit over the whole matrix. A dropped or moved quantiser changes them by 1e-3 to 1e-1.
TOL = 1e-5
# Artifacts are saved with float32 storage here: bfloat16-valued weights make activations land exactly on a rounding
# tie of the activation quantiser far more often, and float32 reordering then flips one code (quarot w8a8 with
# bfloat16 storage: 2.9e-3 on one logit). test_artifact checks that bfloat16 storage reloads bit for bit.
STORAGE = torch.float32


@functools.cache
def _calibration(recipe):
    return calibrate(tiny_forward(MODEL), WINDOWS, [RECIPES[recipe]], progress=False)


def _close(got, want, what):
    top = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= TOL * top, f"{what}: error {err:.3g}, largest logit {top:.3g}"


@pytest.mark.parametrize("recipe,bits", CASES)
def test_decode_latent_and_lowered_graphs_reproduce_the_evaluated_graph(tmp_path, recipe, bits):
    base, r = tiny_forward(MODEL), RECIPES[recipe]
    calib = _calibration(recipe) if r.factor else None
    compressed, report = compress(base, calib, r, 0.6 if r.factor else None, parse_bits(bits))
    artifact.save(tmp_path, model=MODEL, base=artifact.dense(base), compressed=compressed,
                  recipe=r, bits=parse_bits(bits),
                  rho1_target=0.6, report=report, calibration={}, environment={}, save_dtype=STORAGE)
    with torch.no_grad():
        evaluated = compressed.gm(input_ids=IDS)
    decoder = artifact.load(tmp_path, decode=True, max_cache_len=IDS.shape[1], model=tiny(MODEL)).captured
    _close(steps(decoder, IDS), evaluated, "decode graph")
    if not r.factor:
        return
    Pipeline([LatentKVCache(decoder.config)])(decoder)
    quantisers = [n for n in decoder.gm.graph.nodes if n.target is fake_quant_activation]
    assert bool(quantisers) == (bits != "w16a16")
    _close(steps(decoder, IDS), evaluated, "latent-KV decode graph")
    lowered = lowering.lower(copy.deepcopy(decoder))
    int8 = [name for name, b in cache_buffers(lowered).items() if b.dtype == torch.int8]
    assert bool(int8) == (bits != "w16a16"), "8-bit-or-fewer latents are cached as int8 codes"
    _close(steps(lowered, IDS), evaluated, "lowered graph")


@pytest.mark.slow
def test_smollm2_wsvd_w8a8_artifact_decodes_what_was_evaluated(tmp_path, smollm2, smollm2_forward):
    """SmolLM2-135M, full wsvd W8A8 at rho1 0.5 (4 calibration windows of 128 tokens; about 10 minutes): the reloaded
    artifact's lowered decode graph (int8 latents) reproduces the evaluated graph's logits step by step, and
    generates the same greedy tokens lowered and not lowered."""
    from wsvd_passes.eval.data import pydoc_text, token_windows
    from wsvd_passes.eval.generation import greedy_generate

    windows = token_windows(smollm2.tokenizer, pydoc_text("calibration"), 128, max_windows=4)
    recipe, bits = RECIPES["wsvd"], parse_bits("w8a8")
    calib = calibrate(smollm2_forward, windows, [recipe], progress=False)
    compressed, report = compress(smollm2_forward, calib, recipe, 0.5, bits)
    artifact.save(tmp_path, model="smollm2-135m", base=artifact.dense(smollm2_forward), compressed=compressed,
                  recipe=recipe,
                  bits=bits, rho1_target=0.5, report=report, calibration={}, environment={}, save_dtype=STORAGE)
    ids = smollm2.tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    with torch.no_grad():
        evaluated = compressed.gm(input_ids=ids)
    decoder = artifact.load(tmp_path, decode=True, max_cache_len=ids.shape[1] + 8, model=smollm2).captured
    Pipeline([LatentKVCache(decoder.config)])(decoder)
    unlowered = greedy_generate(decoder, ids, 8)
    lowered = lowering.lower(decoder)
    assert any(b.dtype == torch.int8 for b in cache_buffers(lowered).values())
    _close(steps(lowered, ids), evaluated, "lowered graph")
    assert torch.equal(greedy_generate(lowered, ids, 8), unlowered)

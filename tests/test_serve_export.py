"""``wsvd export vllm``: the written directory computes the artifact's function (float64 reference of the
served model, no vLLM needed), records the factor layout, stores tied embeddings once, and rejects what the
plugin cannot serve with one error line."""

import dataclasses
import json
import math

import pytest
import torch
from conftest import tiny, tiny_forward
from safetensors.torch import load_file
from serve_reference import served_logits

from wsvd_passes.algorithms.quantize import parse_bits
from wsvd_passes.artifacts import artifact
from wsvd_passes.cli import main
from wsvd_passes.compression.compress import calibrate, compress
from wsvd_passes.compression.recipes import RECIPES
from wsvd_passes.errors import WsvdError
from wsvd_passes.serve.export import export_vllm
from wsvd_passes.serve.format import FORMAT_VERSION, check_block, latent_cache_layout

WINDOWS = torch.randint(0, 384, (4, 33), generator=torch.Generator().manual_seed(3))
IDS = torch.randint(0, 384, (19,), generator=torch.Generator().manual_seed(5))


def make_artifact(directory, model, recipe, bits="w16a16", rho1=0.6, base=None):
    """Compress tiny ``model`` (or the capture ``base`` of the checkpoint ``model``) with ``recipe`` into ``directory``."""
    base = base or tiny_forward(model)
    r = dataclasses.replace(RECIPES[recipe], finetune_steps=10, qat_steps=5)  # few steps: the layout is what counts
    calib = calibrate(base, WINDOWS, [r], progress=False) if r.factor else None
    compressed, report = compress(base, calib, r, rho1, parse_bits(bits))
    artifact.save(directory, model=model, base=artifact.dense(base), compressed=compressed,
                  recipe=r, bits=parse_bits(bits), rho1_target=rho1, report=report, calibration={}, environment={})
    return compressed


@pytest.mark.parametrize("model,recipe,bits", [("tiny-llama-gqa", "wsvd-noq", "w16a16"),
                                               ("tiny-qwen2", "svd-llm", "w16a16"),
                                               ("tiny-llama-gqa", "qsvd", "w8a8"),
                                               ("tiny-mistral", "wsvd", "w8a8")])
def test_exported_directory_computes_the_artifacts_function(tmp_path, capsys, model, recipe, bits):
    compressed = make_artifact(tmp_path / "art", model, recipe, bits)
    block = export_vllm(tmp_path / "art", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    manifest = artifact.read_manifest(tmp_path / "art")
    family = {"tiny-llama-gqa": "Llama", "tiny-qwen2": "Qwen2", "tiny-mistral": "Mistral"}[model]
    assert config["architectures"] == [f"Wsvd{family}ForCausalLM"] and config["wsvd"] == block
    assert block["format_version"] == FORMAT_VERSION and block["recipe"] == recipe and block["bits"] == bits
    assert block["activation_bits"] == (8 if bits == "w8a8" else None)
    hadamard = block["online_hadamard"]  # the factor orders of the MLP's online Hadamard, [K, M1, M2]
    assert (math.prod(hadamard) == config["intermediate_size"]) if RECIPES[recipe].rotate else hadamard is None
    assert block["qkv_bias"] == (model == "tiny-qwen2")
    joint = block["granularity"] == "joint"
    assert block["kv_cache"] == ("dense" if joint else "latent")  # the default: latent where the factors allow it
    if joint:  # one latent feeds K and V: the latent cache is refused in one line
        assert main(["export", "vllm", str(tmp_path / "art"), str(tmp_path / "latent"), "--kv-cache", "latent"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {recipe} has joint factors") and "--kv-cache dense" in err and "\n" not in err
    for layer, ranks in enumerate(block["layers"]):
        recorded = manifest["ranks"][str(layer)]
        for p in "qkv":
            assert ranks[p]["ranks"] == (recorded["qkv"] if block["granularity"] == "joint" else recorded[p])
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    with torch.no_grad():
        expected = compressed.gm(input_ids=IDS[None])[0].double()
    # float recipes: float64 reference; quantised: the reference in float32 (the quantiser's rounding)
    got = served_logits(tmp_path / "out", IDS, torch.float64 if bits == "w16a16" else torch.float32).double()
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("recipe,bits", [("svd-llm", "w16a16"), ("wsvd-noqat", "w8a8")])
def test_tied_embeddings_are_stored_once(tmp_path, recipe, bits):
    """Unrotated, the head is the embedding (tied); rotated, it is served untied as E S1 G (rotate.TIED_GAMMA)."""
    from transformers import LlamaForCausalLM

    from wsvd_passes.graph.capture import capture_forward
    from wsvd_passes.models.registry import load_model

    config = tiny("tiny-llama-gqa").model.config.to_dict() | {"tie_word_embeddings": True}
    checkpoint = tmp_path / "tied"
    model = LlamaForCausalLM(type(tiny("tiny-llama-gqa").model.config).from_dict(config))
    with torch.no_grad():  # a final-norm gamma of ones would make G the identity
        model.model.norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(checkpoint)
    tiny("tiny-llama-gqa").tokenizer.save_pretrained(checkpoint)
    base = capture_forward(load_model(str(checkpoint)).model)
    compressed = make_artifact(tmp_path / "art", str(checkpoint), recipe, bits, base=base)
    export_vllm(tmp_path / "art", tmp_path / "out")
    tied = recipe == "svd-llm"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in load_file(tmp_path / "out" / "model.safetensors")) is not tied
    with torch.no_grad():
        expected = compressed.gm(input_ids=IDS[None])[0].double()
    got = served_logits(tmp_path / "out", IDS, torch.float64 if tied else torch.float32)
    assert (got.double() - expected).abs().max() <= 1e-4 * expected.abs().max()
    if not tied:  # an artifact with a quantised embedding / LM head is refused in one line
        manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
        (tmp_path / "art" / "manifest.json").write_text(json.dumps(manifest | {"bits": "w8a8e8"}))
        with pytest.raises(WsvdError, match="quantises the embedding and LM head .* without the e suffix"):
            export_vllm(tmp_path / "art", tmp_path / "out2")


def test_unsupported_recipe_is_one_error_line(tmp_path, capsys):
    make_artifact(tmp_path / "art", "tiny-llama-gqa", "quarot", "w8a8")
    assert main(["export", "vllm", str(tmp_path / "art"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: recipe quarot has no low-rank factors") and "wsvd-noq" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    assert main(["export", "vllm", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "has no manifest.json" in capsys.readouterr().err


def test_a_newer_format_version_is_refused_at_load():
    block = {"format": "wsvd-vllm", "format_version": FORMAT_VERSION, "granularity": "head"}
    assert check_block(block) is block
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}; .* reads up to version {FORMAT_VERSION}"):
        check_block(block | {"format_version": FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match="wsvd export vllm"):
        check_block(None)
    assert check_block(dict(block))["kv_cache"] == "dense"  # a block without kv_cache (the first format 1)
    with pytest.raises(ValueError, match="online_hadamard True .* export the directory again"):
        check_block(block | {"online_hadamard": True})  # format 1's flag for a dense matrix
    assert check_block(block | {"online_hadamard": [12, 4, 8]})["online_hadamard"] == [12, 4, 8]
    for granularity, kv_cache in (("head", "paged"), ("joint", "latent")):
        with pytest.raises(ValueError, match=f"kv_cache '{kv_cache}' with {granularity} factors"):
            check_block(block | {"granularity": granularity, "kv_cache": kv_cache})


def test_latent_cache_layout_keeps_the_real_channels():
    """Per-head latents [T, n w] (head h's r_h real columns first): the cache keeps those, sum_h r_h per token;
    over tensor-parallel ranks each keeps its own heads', zero-filled to the widest rank; a projection latent whole."""
    layer = {"k": {"ranks": [4, 1, 3, 3], "width": 4}, "v": {"ranks": [2, 2, 0, 1], "width": 2}}
    block = {"granularity": "head", "layers": [layer]}
    assert latent_cache_layout(block, 0) == {"k": ([0, 1, 2, 3, 4, 8, 9, 10, 12, 13, 14], 11), "v": ([0, 1, 2, 3, 6], 5)}
    assert latent_cache_layout(block, 0, tp_size=2, tp_rank=0) == {"k": ([0, 1, 2, 3, 4], 6), "v": ([0, 1, 2, 3], 4)}
    assert latent_cache_layout(block, 0, tp_size=2, tp_rank=1) == {"k": ([0, 1, 2, 4, 5, 6], 6), "v": ([2], 4)}
    projection = {"granularity": "projection", "layers": [{"k": {"ranks": [5], "width": 5}, "v": {"ranks": [3], "width": 3}}]}
    assert latent_cache_layout(projection, 0, tp_size=2, tp_rank=1) == {"k": ([0, 1, 2, 3, 4], 5), "v": ([0, 1, 2], 3)}

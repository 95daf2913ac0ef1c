"""Artifacts: save -> load gives identical logits (forward and decode graphs), no pickles, clear errors."""

import functools
import json
import zipfile

import pytest
import torch

from conftest import tiny, tiny_forward
from wsvd_passes import artifact
from wsvd_passes.compress import calibrate, compress
from wsvd_passes.errors import WsvdError
from wsvd_passes.generation import greedy_generate
from wsvd_passes.quantize import parse_bits
from wsvd_passes.recipes import RECIPES

MODEL = "tiny-llama-gqa"
WINDOWS = torch.randint(0, 384, (4, 33), generator=torch.Generator().manual_seed(3))
IDS = torch.randint(0, 384, (2, 21), generator=torch.Generator().manual_seed(4))


@functools.cache
def _calibration():
    recipes = [RECIPES[r] for r in ("wsvd", "qsvd", "svd-llm", "wsvd-noq")]
    return calibrate(tiny_forward(MODEL), WINDOWS, recipes, progress=False)


def _save(tmp_path, recipe, bits="w16a16", rho1=0.6):
    base = tiny_forward(MODEL)
    calib = _calibration() if RECIPES[recipe].factor else None
    compressed, report = compress(base, calib, RECIPES[recipe], rho1, parse_bits(bits))
    directory = tmp_path / recipe
    manifest = artifact.save(directory, model=MODEL, base=base, compressed=compressed, recipe=RECIPES[recipe],
                             bits=parse_bits(bits), rho1_target=rho1, report=report,
                             calibration={"windows": len(WINDOWS)}, environment={"torch": torch.__version__})
    return directory, compressed, manifest


@pytest.mark.parametrize("recipe,bits", [("wsvd", "w4a4"), ("qsvd", "w8a8"), ("svd-llm", "w16a16"),
                                         ("quarot", "w8a8")])
def test_reload_gives_identical_logits(tmp_path, recipe, bits):
    directory, compressed, manifest = _save(tmp_path, recipe, bits)
    loaded = artifact.load(directory)
    with torch.no_grad():
        assert torch.equal(loaded.captured.gm(input_ids=IDS), compressed.gm(input_ids=IDS))
    assert manifest["recipe"]["name"] == recipe and manifest["bits"] == bits
    if RECIPES[recipe].factor:
        assert set(manifest["ranks"]) == {"0", "1"} and manifest["reconstruction"]["0"]
        assert (directory / "spectra.safetensors").is_file()
    # load() reads only JSON and safetensors (no pickles): both are written in those formats
    from safetensors import safe_open

    assert json.loads((directory / "manifest.json").read_text())["format"] == artifact.FORMAT
    with safe_open(directory / "weights.safetensors", "pt") as f:
        assert f.metadata()["format"] == artifact.FORMAT and len(list(f.keys())) == manifest["tensors"]


def test_reload_of_the_decode_graph_generates_the_same_tokens(tmp_path):
    directory, compressed, _ = _save(tmp_path, "wsvd-noq")
    decoder = artifact.load(directory, decode=True, max_cache_len=40).captured
    tokens = IDS[:1, :5]
    with torch.no_grad():  # greedy continuation through the saved full-sequence graph
        for _ in range(8):
            tokens = torch.cat([tokens, compressed.gm(input_ids=tokens)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(greedy_generate(decoder, IDS[:1, :5], 8), tokens)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(WsvdError, match="no manifest.json"):
        artifact.load(tmp_path)
    directory, _, manifest = _save(tmp_path, "svd-llm")
    newer = dict(manifest, format_version=artifact.FORMAT_VERSION + 1)
    (directory / "manifest.json").write_text(json.dumps(newer))
    with pytest.raises(WsvdError, match="format version 2 .* upgrade wsvd-passes"):
        artifact.load(directory)
    (directory / "manifest.json").write_text(json.dumps(dict(manifest, model="tiny-llama")))
    with pytest.raises(WsvdError, match="not the ones"):
        artifact.load(directory)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    (directory / "weights.safetensors").unlink()
    with pytest.raises(WsvdError, match="no weights.safetensors"):
        artifact.load(directory)


def test_model_pt2_is_written_but_not_needed(tmp_path):
    directory, _, manifest = _save(tmp_path, "svd-llm")
    assert manifest["exported_program"] == "model.pt2" and zipfile.is_zipfile(directory / "model.pt2")
    (directory / "model.pt2").unlink()
    artifact.load(directory)


def test_tied_embeddings_reload_on_the_decode_graph(tmp_path):
    from transformers import LlamaForCausalLM

    config = tiny(MODEL).model.config.to_dict() | {"tie_word_embeddings": True}
    model = LlamaForCausalLM(type(tiny(MODEL).model.config).from_dict(config))
    checkpoint = tmp_path / "tied"
    model.save_pretrained(checkpoint)
    tiny(MODEL).tokenizer.save_pretrained(checkpoint)
    from wsvd_passes.capture import capture_forward
    from wsvd_passes.models import load_model

    base = capture_forward(load_model(str(checkpoint)).model)
    compressed, _ = compress(base, None, RECIPES["quarot"], None, parse_bits("w8a8"))  # rotates the tied head
    artifact.save(tmp_path / "art", model=str(checkpoint), base=base, compressed=compressed, recipe=RECIPES["quarot"],
                  bits=parse_bits("w8a8"), rho1_target=None, report=None, calibration={}, environment={})
    decoder = artifact.load(tmp_path / "art", decode=True, max_cache_len=24).captured
    tokens = IDS[:1, :5]
    with torch.no_grad():
        for _ in range(6):
            tokens = torch.cat([tokens, compressed.gm(input_ids=tokens)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(greedy_generate(decoder, IDS[:1, :5], 6), tokens)

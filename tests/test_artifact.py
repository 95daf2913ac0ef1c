"""Artifacts: save -> load gives identical logits (forward and decode graphs), no pickles, clear errors."""

import functools
import gc
import json
import weakref
import zipfile

import pytest
import torch
from conftest import fresh_forward, tiny, tiny_forward

from wsvd_passes.algorithms.hadamard import FACTOR_NAMES
from wsvd_passes.algorithms.quantize import parse_bits
from wsvd_passes.artifacts import artifact
from wsvd_passes.artifacts.packing import tensor_digest
from wsvd_passes.compression.compress import calibrate, compress
from wsvd_passes.compression.recipes import RECIPES
from wsvd_passes.errors import WsvdError
from wsvd_passes.eval.generation import greedy_generate
from wsvd_passes.graph.capture import capture_forward
from wsvd_passes.models.registry import load_model

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
    manifest = artifact.save(directory, model=MODEL, base=artifact.dense(base), compressed=compressed,
                             recipe=RECIPES[recipe], bits=parse_bits(bits), rho1_target=rho1, report=report,
                             calibration={"windows": len(WINDOWS)}, environment={"torch": torch.__version__})
    return directory, compressed, manifest


@pytest.mark.parametrize("recipe,bits", [("wsvd", "w4a4"), ("qsvd", "w8a8"), ("svd-llm", "w16a16"),
                                         ("quarot", "w8a8"), ("wsvd", "w4a4c0.9+latent+layer-1")])
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
    with pytest.raises(WsvdError, match=f"format version {artifact.FORMAT_VERSION + 1} .* upgrade wsvd-passes"):
        artifact.load(directory)
    older_rotated = dict(manifest, format_version=3, recipe=dict(manifest["recipe"], rotate=True))
    (directory / "manifest.json").write_text(json.dumps(older_rotated))
    with pytest.raises(WsvdError, match="rotated model in artifact format 3.* compress it again"):
        artifact.load(directory)
    (directory / "manifest.json").write_text(json.dumps(dict(manifest, model="tiny-llama")))
    with pytest.raises(WsvdError, match="not the ones"):
        artifact.load(directory)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    (directory / "weights.safetensors").unlink()
    with pytest.raises(WsvdError, match="no weights.safetensors"):
        artifact.load(directory)


def test_model_pt2_is_written_on_request_but_not_needed(tmp_path):
    directory, _, manifest = _save(tmp_path, "svd-llm")
    assert not (directory / "model.pt2").exists() and "save_pt2" in manifest["exported_program"]
    base = tiny_forward(MODEL)
    compressed, report = compress(base, _calibration(), RECIPES["svd-llm"], 0.6, parse_bits("w16a16"))
    manifest = artifact.save(tmp_path / "pt2", model=MODEL, base=artifact.dense(base), compressed=compressed,
                             recipe=RECIPES["svd-llm"], bits=parse_bits("w16a16"), rho1_target=0.6, report=report,
                             calibration={}, environment={}, save_pt2=True)
    assert manifest["exported_program"] == "model.pt2" and zipfile.is_zipfile(tmp_path / "pt2" / "model.pt2")
    (tmp_path / "pt2" / "model.pt2").unlink()
    artifact.load(tmp_path / "pt2")


def test_in_place_compression_writes_the_artifact_of_a_copy_and_frees_the_dense_weights(tmp_path):
    """``compress(in_place=True)`` (``wsvd compress``) writes the weights.safetensors a compressed copy writes, bit for
    bit; the change set by the digests recorded before compressing is the one by value against the dense tensors;
    no dense tensor the passes replaced is still alive, and the calibration is used up."""
    recipe, bits = RECIPES["wsvd"], parse_bits("w8a8e8")
    kept = tiny_forward(MODEL)
    copied, report = compress(kept, calibrate(kept, WINDOWS, [recipe], progress=False), recipe, 0.6, bits)
    dense_state, state = kept.gm.state_dict(), copied.gm.state_dict()
    record = artifact.dense(kept)
    by_value = {n for n, t in state.items() if n not in dense_state or not torch.equal(t, dense_state[n])}
    assert by_value and by_value == {n for n, t in state.items() if record.digests.get(n) != tensor_digest(t)}
    captured = capture_forward(load_model(MODEL).model)  # its weights have no other holder
    before = [weakref.ref(t) for t in captured.gm.state_dict().values()]
    in_place_record = artifact.dense(captured)
    calib = calibrate(captured, WINDOWS, [recipe], progress=False)
    in_place, in_place_report = compress(captured, calib, recipe, 0.6, bits, in_place=True)
    assert in_place is captured and not (calib.stats or calib.groups or calib.fisher or calib.qat_targets)
    gc.collect()
    now = {id(t) for t in in_place.gm.state_dict().values()}
    assert all(ref() is None or id(ref()) in now for ref in before)

    def written(name, base, compressed, report):
        manifest = artifact.save(tmp_path / name, model=MODEL, base=base, compressed=compressed, recipe=recipe,
                                 bits=bits, rho1_target=0.6, report=report, calibration={}, environment={})
        return (tmp_path / name / "weights.safetensors").read_bytes(), manifest

    assert written("copy", record, copied, report) == written("in_place", in_place_record, in_place, in_place_report)
    with pytest.raises(WsvdError, match="heals against the uncompressed graph"):
        compress(fresh_forward(MODEL), None, RECIPES["wsvd-heal"], 0.6, bits, in_place=True)


@pytest.mark.parametrize("bits,codes", [("w8a8", "weight"), ("w4a4", "weight_packed")])
def test_quantised_weights_are_stored_packed_and_the_rest_in_bfloat16(tmp_path, bits, codes):
    directory, compressed, manifest = _save(tmp_path, "wsvd", bits)
    from safetensors import safe_open

    quantized = manifest["storage"]["quantized"]
    assert quantized and all(q["bits"] == int(bits[1]) for q in quantized.values())
    with safe_open(directory / "weights.safetensors", "pt") as f:
        names = set(f.keys())
        name = next(iter(quantized))
        stored = f.get_tensor(f"{name}.{codes}")
        assert stored.dtype == (torch.int8 if bits == "w8a8" else torch.int32)
        W = compressed.gm.get_parameter(name)
        assert stored.numel() * stored.element_size() == W.numel() * int(bits[1]) // 8
        assert name not in names and f"{name}.weight_scale" in names
        floats = [f.get_tensor(n) for n in names if f.get_tensor(n).is_floating_point() and "weight_scale" not in n
                  and "hadamard" not in n]
        assert floats and all(t.dtype == torch.bfloat16 for t in floats)
    assert manifest["bytes"] == (directory / "weights.safetensors").stat().st_size


def test_equal_tensors_are_stored_once():
    from wsvd_passes.artifacts.packing import pack, unpack

    embedding = torch.randn(7, 5)
    stored, layout = pack({"embed": embedding, "lm_head": embedding.clone(), "other": torch.randn(5)}, {}, {},
                          {"embed", "lm_head", "other"}, torch.float32)
    assert len(stored) == 2 and layout["aliases"] == {"lm_head": "embed"}
    out = unpack(stored, layout, "here")
    assert torch.equal(out["lm_head"], embedding) and torch.equal(out["embed"], embedding)


def test_damaged_packed_artifacts_give_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    directory, _, manifest = _save(tmp_path, "quarot", "w4a4")  # packed 4-bit weights, quick to replay
    path = directory / "weights.safetensors"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(WsvdError, match="weights.safetensors cannot be read .* truncated"):
        artifact.load(directory)
    path.write_bytes(good)
    name = next(iter(manifest["storage"]["quantized"]))
    for key, damage, message in [
        (f"{name}.weight_scale", lambda t: t[:-1], "do not form a 4-bit weight"),
        (f"{name}.weight_packed", lambda t: torch.zeros_like(t), "do not form a 4-bit weight"),  # codes -8
        (f"{name}.weight_packed", lambda t: t[:, :-1], "does not hold a"),
        (f"{name}.weight_shape", None, "is missing"),
    ]:
        tensors = load_file(path)
        if damage is None:
            del tensors[key]
        else:
            tensors[key] = damage(tensors[key]).contiguous()
        save_file(tensors, path, metadata={"format": artifact.FORMAT})
        with pytest.raises(WsvdError, match=message):
            artifact.load(directory)
        path.write_bytes(good)
    artifact.load(directory)



@pytest.mark.parametrize("bits", ["w8a8", "w8a8e8"])
def test_tied_embeddings_are_stored_once_and_reload_on_the_decode_graph(tmp_path, bits):
    """A rotated tied head keeps reading the (rotated, optionally int8) embedding table: one copy in the file."""
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    config = tiny(MODEL).model.config.to_dict() | {"tie_word_embeddings": True}
    model = LlamaForCausalLM(type(tiny(MODEL).model.config).from_dict(config))
    checkpoint = tmp_path / "tied"
    model.save_pretrained(checkpoint)
    tiny(MODEL).tokenizer.save_pretrained(checkpoint)
    from wsvd_passes.graph.capture import capture_forward
    from wsvd_passes.models.registry import load_model

    base = capture_forward(load_model(str(checkpoint)).model)
    compressed, _ = compress(base, None, RECIPES["quarot"], None, parse_bits(bits))  # rotates the tied head
    manifest = artifact.save(tmp_path / "art", model=str(checkpoint), base=artifact.dense(base), compressed=compressed,
                             recipe=RECIPES["quarot"], bits=parse_bits(bits), rho1_target=None, report=None,
                             calibration={}, environment={})
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    with safe_open(tmp_path / "art" / "weights.safetensors", "pt") as f:
        tables = [f.get_tensor(k) for k in f.keys() if tuple(f.get_slice(k).get_shape()) == (vocab, hidden)]
        stored = set(f.keys())
    assert len(tables) == 1 and tables[0].dtype == (torch.int8 if bits.endswith("e8") else torch.bfloat16)
    assert any("lm_head" in alias for alias in manifest["storage"]["aliases"])
    decoder = artifact.load(tmp_path / "art", decode=True, max_cache_len=24).captured
    layers = model.config.num_hidden_layers
    for factor in FACTOR_NAMES:  # one set per MLP, stored and held once
        name = f"online_hadamard_{factor}"
        hadamards = [b for n, b in decoder.gm.named_buffers(remove_duplicate=False) if n.endswith(name)]
        assert len(hadamards) == layers and len({b.untyped_storage().data_ptr() for b in hadamards}) == 1
        # at most one copy in the file (equal factors, e.g. m1 == m2, may alias each other's)
        assert sum(n.endswith(name) for n in stored) <= 1
        assert sum(n.endswith(name) for n in stored | set(manifest["storage"]["aliases"])) == layers
    tokens = IDS[:1, :5]
    with torch.no_grad():
        for _ in range(6):
            tokens = torch.cat([tokens, compressed.gm(input_ids=tokens)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(greedy_generate(decoder, IDS[:1, :5], 6), tokens)


def test_a_weight_off_its_recorded_grid_is_refused_in_one_line():
    from wsvd_passes.algorithms.quantize import quantize_weight
    from wsvd_passes.artifacts.packing import pack

    codes, scale = quantize_weight(torch.randn(6, 9), 8)
    pack({"w": codes * scale[:, None], "w_scale": scale}, {"w": (8, "w_scale")}, {"w_scale": scale}, {"w"},
         torch.bfloat16)  # on the grid: fine
    with pytest.raises(WsvdError, match="w is not on the 8-bit grid of its recorded scale"):
        pack({"w": codes * scale[:, None], "w_scale": scale}, {"w": (8, "w_scale")}, {"w_scale": scale / 2}, {"w"},
             torch.bfloat16)  # edited after FakeQuantize: the codes would wrap around in int8

"""Streamed compression (one decoder layer at a time) against the whole-model compression."""

import copy
import dataclasses
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny, tiny_forward
from safetensors import safe_open
from safetensors.torch import load_file

from wsvd_passes.algorithms.hadamard import FACTOR_NAMES
from wsvd_passes.algorithms.quantize import parse_bits
from wsvd_passes.artifacts import artifact
from wsvd_passes.cli import main
from wsvd_passes.compression import checkpoint, stream
from wsvd_passes.compression.checkpoint import Checkpoint
from wsvd_passes.compression.compress import calibrate, compress, factor_plan
from wsvd_passes.compression.recipes import RECIPES
from wsvd_passes.compression.stream import calibrate_streamed, compress_checkpoint, compress_streamed
from wsvd_passes.errors import WsvdError
from wsvd_passes.eval.mm_data import image_text_samples, load_items, sample_items

MODEL = "tiny-llama-gqa"
VLM, MROPE_VLM = "tiny-llava", "tiny-qwen2-vl"  # 1-D RoPE; multimodal RoPE ((t, h, w) position ids in every layer)
DATA = Path(__file__).parent / "data" / "mc_synthetic" / "data.jsonl"
WINDOWS = torch.randint(0, 384, (4, 33), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    lm = tiny(MODEL)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vlm_checkpoints(tmp_path_factory):
    """name -> the checkpoint directory (weights and processor) of that tiny VLM, written once per module."""
    @functools.cache
    def save(name):
        path = tmp_path_factory.mktemp(name)
        lm = tiny(name)
        lm.model.save_pretrained(path)  # transformers writes LLaVA's legacy key names (language_model.model.*)
        lm.processor.save_pretrained(path)
        return path
    return save


def calibration_data(request, model):
    """(checkpoint directory, whole-model data, streamed data) of ``model``: the same text windows, or the image-text
    samples of the whole model and those of the eager front read from the checkpoint (vision tower, projector, merge
    into the embeddings), checked to be equal bit for bit and of different lengths (layer graphs of any length)."""
    if model == MODEL:
        return request.getfixturevalue("checkpoint_dir"), WINDOWS, WINDOWS
    path = request.getfixturevalue("vlm_checkpoints")(model)
    items = sample_items(load_items(DATA), 2, 0)  # what --calib-samples 2 draws
    whole, streamed = image_text_samples(tiny(model), items), stream.front_samples(Checkpoint(path), items)
    assert streamed[0]["labels"].shape != streamed[1]["labels"].shape
    for mine, theirs in zip(streamed, whole):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    return path, whole, streamed


@pytest.mark.parametrize("model,recipe,rho1,rho2", [(MODEL, "wsvd-noq", None, 0.5), (MODEL, "svd-llm", 0.6, 0.4),
                                                    (VLM, "wsvd-noq", 0.6, None),
                                                    pytest.param(MROPE_VLM, "wsvd-noq", 0.6, None, marks=pytest.mark.slow)])
def test_streamed_calibration_gives_the_whole_models_ranks_and_factors(model, recipe, rho1, rho2, tmp_path, request):
    """Statistics, importance scores and the Fisher of the layer-wise backward (answer-only labels for the VLM) equal
    the whole graph's; so do the ranks and the factors of the shards, under a parameter budget (rho1), a cache budget
    (rho2) or both."""
    r = RECIPES[recipe]
    checkpoint_dir, data, streamed_data = calibration_data(request, model)
    whole = calibrate(tiny_forward(model), data, [r], progress=False)
    streamed = calibrate_streamed(Checkpoint(checkpoint_dir), streamed_data, r, tmp_path, progress=False)
    plan, report = factor_plan(whole, r, rho1, rho2)
    for key, s in whole.scores.get((r.granularity, r.scaling), {}).items():
        torch.testing.assert_close(streamed.scores[key], s, rtol=1e-4, atol=1e-12)
    for (layer, p), f in whole.fisher.items():  # the layer-wise backward gives the whole graph's gradients
        assert f.abs().max() > 0
        torch.testing.assert_close(streamed.store.get(f"fisher{layer:05d}")[p], f, rtol=1e-4, atol=1e-12)
    sreport, shards = compress_streamed(Checkpoint(checkpoint_dir), streamed, r, rho1, parse_bits("w16"), tmp_path / "out",
                                        rho2=rho2, progress=False)
    assert sreport.ranks == report.ranks and len(plan) == len(shards) - 1 == 2  # and the no-layer graph's shard
    assert sreport.rho1 == pytest.approx(report.rho1) and sreport.rho2 == pytest.approx(report.rho2)
    assert sreport.rho2_target == report.rho2_target == rho2 and (rho2 is None or report.rho2 <= rho2 + 1e-9)
    for layer, shard in enumerate(shards[:-1]):
        saved = load_file(shard)
        for p in plan[layer].downs:
            down = next(t for n, t in saved.items() if n.endswith(f".wsvd.{p}_down"))
            torch.testing.assert_close(down, plan[layer].downs[p].to(down.dtype), rtol=1e-5, atol=1e-6)


def test_compress_streams_the_whole_models_artifact_when_the_model_would_not_fit(checkpoint_dir, tmp_path, monkeypatch,
                                                                                   capsys):
    out = tmp_path / "streamed"
    argv = ["compress", "--model", str(checkpoint_dir), "--recipe", "wsvd-noq", "--rho1", "0.6", "--calib-windows", "4",
            "--seq-len", "33", "--quiet", "--out", str(out), "--save-dtype", "float32"]  # compared with float32 maths
    skeleton = Checkpoint(checkpoint_dir).skeleton
    need = checkpoint.whole_model_need(Checkpoint(checkpoint_dir))
    assert need == checkpoint.WHOLE_MODEL_FACTOR * 4 * sum(p.numel() for p in skeleton.parameters())
    monkeypatch.setattr(checkpoint, "available_memory", lambda: need - 1)  # no --stream: streamed because it would not fit
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.startswith("compressing layer by layer (--stream): the whole-model compression needs about")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["streamed"] and not list(out.glob("layer*")) and not list(out.glob(".*tmp"))
    loaded = artifact.load(out)  # the model fingerprint and every tensor name match the whole-model capture
    base = tiny_forward(MODEL)
    calib = calibrate(base, loaded_windows(checkpoint_dir), [RECIPES["wsvd-noq"]], progress=False)
    compressed, report = compress(base, calib, RECIPES["wsvd-noq"], 0.6, parse_bits("w16"))
    assert manifest["ranks"] == {str(k): v for k, v in report.ranks.items()}
    ids = torch.randint(0, 384, (2, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = compressed.gm(input_ids=ids)
        torch.testing.assert_close(loaded.captured.gm(input_ids=ids), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base.gm(input_ids=ids), expected, atol=1e-3)


def test_streamed_wsvd_w8a8e8_is_the_whole_models_artifact(checkpoint_dir, tmp_path):
    """The full WSVD recipe streamed: rotations (S1 global, fed rotated), the Fisher of the rotated basis from the
    layer-wise backward, S2, W8A8 with 8-bit embedding and LM head (the no-layer graph): every tensor of the reloaded
    artifact equals the whole-model compression's. QAT takes no steps here: 50 Adam steps turn float-rounding
    differences of its Fisher targets (1e-6 relative) into weight differences of about 1% (measured on the whole
    graph alone, by perturbing F' by 1e-6), so only the untrained recipe can be compared exactly."""
    recipe, bits = dataclasses.replace(RECIPES["wsvd"], qat_steps=0), parse_bits("w8a8e8")
    out = tmp_path / "streamed"
    manifest = compress_checkpoint(checkpoint_dir, WINDOWS, recipe, 0.6, bits, out, calibration={}, environment={},
                                   save_dtype=torch.float32, progress=False)
    assert manifest["bits"] == "w8a8e8" and manifest["qat"]["heads"] == 2 * (manifest["heads"]["n_heads"] + 2 * manifest["heads"]["n_kv_heads"])
    loaded = artifact.load(out)
    base = tiny_forward(MODEL)
    compressed, report = compress(base, calibrate(base, WINDOWS, [recipe], progress=False), recipe, 0.6, bits)
    whole = assert_same_compression(manifest, loaded, base, compressed, report)
    assert any("embed_tokens" in name for name in whole["quantized"])
    layers = len(manifest["ranks"])  # equal tensors of different shards are stored once (every MLP's Hadamard)
    with safe_open(out / "weights.safetensors", "pt") as f:
        stored = {n for n in f.keys() if "online_hadamard" in n}
    assert 0 < len(stored) <= len(FACTOR_NAMES)
    assert len(stored | {n for n in manifest["storage"]["aliases"] if "online_hadamard" in n}) == len(FACTOR_NAMES) * layers


def assert_same_compression(manifest, loaded, base, compressed, report) -> dict:
    """The reloaded streamed artifact (``manifest``, ``loaded``) is the whole-model compression of ``base``
    (``compressed``, ``report``): the same ranks, the same weights quantised and packed alike, every tensor equal to
    float rounding. Returns the whole-model packing layout."""
    assert manifest["ranks"] == {str(k): v for k, v in report.ranks.items()}
    whole = artifact.packed_changes(artifact.digests(base.gm), compressed.gm, torch.float32)[1]
    assert manifest["storage"]["quantized"] == whole["quantized"]
    mine, theirs = loaded.captured.gm.state_dict(), compressed.gm.state_dict()
    assert sorted(mine) == sorted(theirs)
    for name, t in theirs.items():
        torch.testing.assert_close(mine[name], t, rtol=1e-5, atol=1e-7, msg=name)
    return whole


@pytest.mark.slow  # 15 to 25 CPU s each: a streamed and a whole-model compression and a reloaded artifact
@pytest.mark.parametrize("model,recipe,bits,cli", [(VLM, "wsvd-noq", "w16", True), (VLM, "wsvd", "w8a8", False),
                                                   (MROPE_VLM, "wsvd", "w8a8", False)])
def test_a_streamed_vlm_is_the_whole_vlms_artifact(tmp_path, model, recipe, bits, cli, request):
    """LLaVA and Qwen2-VL streamed, through the CLI (--calib) or without QAT steps (see above; the CLI runs the
    recipe's): the same ranks and tensors as the whole-model compression (factors, S1 applied to the incoming
    embeddings, W8A8 weights) and, reloaded, the same logits."""
    r, b = RECIPES[recipe] if cli else dataclasses.replace(RECIPES[recipe], qat_steps=0), parse_bits(bits)
    checkpoint_dir, whole_samples, samples = calibration_data(request, model)
    out = tmp_path / "streamed"
    if cli:
        assert main(["compress", "--stream", "--model", str(checkpoint_dir), "--recipe", recipe, "--rho1", "0.6",
                     "--bits", bits, "--calib", str(DATA), "--calib-samples", "2", "--save-dtype", "float32", "--quiet",
                     "--out", str(out)]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
    else:
        manifest = compress_checkpoint(checkpoint_dir, samples, r, 0.6, b, out, calibration={}, environment={},
                                       save_dtype=torch.float32, progress=False)
    loaded = artifact.load(out)  # the VLM checkpoint (fingerprint of its decoder and LM head) and every tensor name
    base = tiny_forward(model)
    compressed, report = compress(base, calibrate(base, whole_samples, [r], progress=False), r, 0.6, b)
    assert_same_compression(manifest, loaded, base, compressed, report)
    assert ("wsvd_input_rotation" in loaded.captured.gm.state_dict()) == r.rotate
    kwargs = {k: v for k, v in samples[1].items() if k != "labels"}
    with torch.no_grad():
        expected = compressed.gm(**kwargs)
        torch.testing.assert_close(loaded.captured.gm(**kwargs), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base.gm(**kwargs), expected, atol=1e-3)


def test_vlms_stream_with_image_text_data_and_checkpoints_transformers_converts_are_refused(vlm_checkpoints,
                                                                                               checkpoint_dir, tmp_path,
                                                                                               capsys):
    from safetensors.torch import save_file
    from transformers import Qwen3VLMoeConfig

    moe = tmp_path / "qwen3-vl-moe"  # its experts are one fused tensor per layer, which transformers converts
    Qwen3VLMoeConfig(text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=16, num_experts=2, moe_intermediate_size=16),
                     vision_config=dict(depth=1, out_hidden_size=32)).save_pretrained(moe)
    save_file({"model.language_model.layers.0.mlp.experts.down_proj": torch.zeros(2, 16, 32)},  # as save_pretrained
              moe / "model.safetensors")                                                         # names it
    vlm = vlm_checkpoints(VLM)
    capsys.readouterr()
    argv = ["compress", "--stream", "--recipe", "wsvd-noq", "--rho1", "0.5", "--quiet", "--out", str(tmp_path / "x")]
    for model, extra, message in [
            (moe, ["--calib", str(DATA)], "transformers converts the checkpoint tensor "
             "model.language_model.layers.0.mlp.experts.down_proj on loading (not a plain rename), which --stream "
             "does not read: compress with --no-stream"),
            (vlm, [], "is a vision-language model: give image-text calibration data with --calib"),
            (checkpoint_dir, ["--calib", str(DATA)], "is a text-only model: use --calib-data FILE.txt")]:
        assert main(argv + ["--model", str(model), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("recipe,bits", [("wsvd-heal-noq", "w16"), ("wsvd-heal", "w8a8")])
def test_streamed_healing_lowers_each_layers_output_error_and_the_artifact_has_the_reported_error(tmp_path, recipe,
                                                                                                    bits):
    """Layer-local healing: each layer's relative output error against the dense layer, on the dense inputs (in the
    rotated basis for the rotated recipe), as reported by the pass, is the error of the reloaded artifact's layer;
    healing lowers the calibration error. q and k are scaled up so that attention is peaked and the truncation
    error of a random tiny model is large (relative error ~0.5 instead of ~5e-4)."""
    from wsvd_passes.algorithms.hadamard import random_hadamard
    from wsvd_passes.artifacts.artifact import _put_tensors, placeholder_plan, placeholder_targets, read_weights
    from wsvd_passes.compression.compress import recipe_passes
    from wsvd_passes.graph.pipeline import Pipeline
    from wsvd_passes.graph.sites import find_sites
    from wsvd_passes.passes.heal import LayerOutputError
    from wsvd_passes.passes.rotate import S1_SEED

    model = copy.deepcopy(tiny(MODEL).model)  # tiny() is shared by the other tests
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                t.mul_(6)
    model.save_pretrained(tmp_path / "ckpt")
    r = dataclasses.replace(RECIPES[recipe], heal_steps=20, heal_lr=2e-4, qat_steps=0)
    windows = torch.randint(0, 384, (8, 33), generator=torch.Generator().manual_seed(5))
    out = tmp_path / "out"
    manifest = compress_checkpoint(tmp_path / "ckpt", windows, r, 0.3, parse_bits(bits), out, calibration={},
                                   environment={}, save_dtype=torch.float32, progress=False)
    h = manifest["heal"]
    assert h["objective"] == "layer_output_error" and h["val_windows"] == 1 and h["train_windows"] == 7
    assert h["calib_after"] < 0.98 * h["calib_before"] and 0.2 < h["calib_before"] < 1  # measured: 0.49 -> 0.46
    checkpoint = Checkpoint(tmp_path / "ckpt")
    weights = read_weights(out, manifest)
    S1 = random_hadamard(checkpoint.config.hidden_size, S1_SEED).float() if r.rotate else None
    hidden = torch.nn.functional.embedding(windows[-1:], checkpoint.tensor("model.embed_tokens.weight"))
    for layer, reported in h["per_layer"].items():
        assert reported["val_after"] <= reported["val_before"]
        dense, compressed = (stream.capture_layer(checkpoint, int(layer), 33) for _ in range(2))
        sites, base_names = find_sites(compressed.gm), set(compressed.gm.state_dict())
        Pipeline(recipe_passes(r, parse_bits(bits), placeholder_plan(sites, manifest, r.granularity),
                               placeholder_targets(sites) if r.qat else None, replay=True))(compressed)
        state = compressed.gm.state_dict()
        _put_tensors(compressed, {n: t for n, t in weights.items() if n in state}, base_names, out)
        with torch.no_grad():
            target = dense.gm(hidden_states=hidden)
        sample = {"hidden_states": hidden @ S1, "target": target @ S1} if S1 is not None else \
            {"hidden_states": hidden, "target": target}
        error = LayerOutputError().scorer(torch.device("cpu"), 1)(compressed.gm, [sample])
        assert error == pytest.approx(reported["val_after"], rel=1e-5), layer
        hidden = target


@pytest.mark.slow  # about a minute each: an uninterrupted, a killed and a resumed streamed run
@pytest.mark.parametrize("model", [MODEL, VLM])
def test_a_killed_run_resumes_to_the_same_artifact(model, tmp_path, monkeypatch, capsys, request):
    """Kill a streamed run while it writes layer 1, resume it: the artifact of an uninterrupted run. The VLM's run
    streams by default (it would not fit), so that path and its image-text calibration resume too."""
    from wsvd_passes.compression import stream as stream_module

    path = request.getfixturevalue("checkpoint_dir") if model == MODEL else request.getfixturevalue("vlm_checkpoints")(VLM)
    data = ["--calib-windows", "4", "--seq-len", "33"] if model == MODEL else ["--calib", str(DATA), "--calib-samples", "2"]
    argv = ["compress", "--model", str(path), "--recipe", "wsvd-noq", "--rho1", "0.6", "--quiet", *data]
    assert main(argv + ["--stream", "--out", str(tmp_path / "whole")]) == 0
    if model == VLM:
        monkeypatch.setattr(checkpoint, "available_memory", lambda: 1)
    else:
        argv.append("--stream")
    write_shard, written = stream_module.write_shard, []

    def killed_after_layer_0(directory, name, tensors, metadata=None):
        if name == "layer00001":
            raise KeyboardInterrupt  # the process dies while layer 1 is being written
        written.append(name)
        return write_shard(directory, name, tensors, metadata)

    monkeypatch.setattr(stream_module, "write_shard", killed_after_layer_0)  # where the shards are written
    out = tmp_path / "resumed"
    assert main(argv + ["--out", str(out)]) == 130  # interrupted
    assert model == MODEL or "compressing layer by layer (--stream)" in capsys.readouterr().err
    monkeypatch.setattr(stream_module, "write_shard", write_shard)
    assert "layer00000" in written and (out / "layer00000.safetensors").is_file()
    assert main([a if a != "0.6" else "0.5" for a in argv] + ["--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "error: --resume: " in err and "another rho1" in err
    monkeypatch.setattr("wsvd_passes.compression.stream.calibrate_streamed", None)  # resuming does not calibrate again
    written.clear()
    monkeypatch.setattr(stream_module, "write_shard", lambda *a, **k: written.append(a[1]) or write_shard(*a, **k))
    assert main(argv + ["--out", str(out), "--resume"]) == 0
    assert "layer00000" not in written and "layer00001" in written  # layer 0 was kept
    a, b = load_file(tmp_path / "whole" / "weights.safetensors"), load_file(out / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (tmp_path / "whole", out))
    assert ma["ranks"] == mb["ranks"] and ma["reconstruction"] == mb["reconstruction"]


def loaded_windows(checkpoint_dir):
    """The calibration windows `compress --calib-windows 4 --seq-len 33` cuts from the default text."""
    from wsvd_passes.eval.data import text_source, token_windows

    return token_windows(tiny(MODEL).tokenizer, text_source(None, "calibration")[0], 33, 4)


def test_bad_checkpoints_and_recipes_are_one_line_errors(checkpoint_dir, tmp_path, capsys, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "missing"
    shutil.copytree(checkpoint_dir, broken)
    (broken / "model.safetensors").rename(broken / "model-00001-of-00002.safetensors")
    keys = load_file(broken / "model-00001-of-00002.safetensors")
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: "model-00001-of-00002.safetensors" if "layers.1" not in k else "model-00002-of-00002.safetensors" for k in keys}}))
    with pytest.raises(WsvdError, match="lacks the shard model-00002-of-00002"):
        Checkpoint(broken)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(checkpoint_dir, mismatched)
    tensors = load_file(mismatched / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"][:16]
    save_file(tensors, mismatched / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WsvdError, match=r"k_proj.weight is \(16, 96\), the config says \(32, 96\)"):
        calibrate_streamed(Checkpoint(mismatched), WINDOWS, RECIPES["wsvd-noq"], tmp_path, progress=False)
    with pytest.raises(WsvdError, match="quarot has no low-rank factors: --stream runs the low-rank recipes"):
        calibrate_streamed(Checkpoint(checkpoint_dir), WINDOWS, RECIPES["quarot"], tmp_path, progress=False)
    assert main(["compress", "--model", MODEL, "--recipe", "wsvd-noq", "--rho1", "0.5", "--stream", "--out",
                 str(tmp_path / "x")]) == 2
    assert "error: --stream reads a checkpoint directory" in capsys.readouterr().err
    for extra, message in [(["--recipe", "wsvd-noq", "--rho2", "0.01"], "rho2 0.01 is below the minimum of 1 component"),
                           (["--recipe", "wsvd", "--rho1", "0.5", "--bits", "w4a4+down_proj+layer-1"],
                            "8-bit exceptions by layer (layer-1) are whole-model only for now"),
                           (["--recipe", "qsvd", "--rho1", "0.5", "--bits", "w8a8", "--tune-beta"],
                            "--stream compresses with the recipe's own beta: drop --tune-beta")]:
        assert main(["compress", "--stream", "--model", str(checkpoint_dir), "--calib-windows", "2", "--seq-len", "17",
                     "--quiet", "--out", str(tmp_path / "y"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    monkeypatch.setattr(checkpoint, "available_memory", lambda: 1)  # would not fit, cannot stream: said, runs whole-model
    assert main(["compress", "--model", str(checkpoint_dir), "--recipe", "quarot", "--rho1", "0.6", "--bits", "w8a8",
                 "--calib-windows", "2", "--seq-len", "17", "--quiet", "--out", str(tmp_path / "z")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: the whole-model compression needs about") and err.count("\n") == 1
    assert "cannot stream (recipe quarot has no low-rank factors" in err
    assert not json.loads((tmp_path / "z" / "manifest.json").read_text()).get("streamed")


@pytest.mark.slow
def test_streamed_peak_memory_does_not_grow_with_depth(tmp_path):
    # random bf16 checkpoints of width 1024 with 2 and 16 layers, each compressed in its own process:
    # 14 more layers may cost at most 1.5 layers' bytes (bf16) of peak RSS
    from wsvd_passes.models.random_checkpoint import write_random_checkpoint

    peaks, layer_bytes = {}, None
    for layers in (2, 16):
        path = tmp_path / f"l{layers}"
        total = write_random_checkpoint(path, hidden=1024, intermediate=2816, layers=layers, heads=16, kv_heads=4,
                                        vocab=2048)
        code = ("import resource, sys; from wsvd_passes.cli import main; "
                f"rc = main(['compress', '--stream', '--model', {str(path)!r}, '--recipe', 'wsvd-noq', '--rho1', '0.5', "
                f"'--calib-windows', '2', '--seq-len', '64', '--quiet', '--out', {str(tmp_path / f'out{layers}')!r}]); "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        peaks[layers] = int(run.stdout.split()[-1]) * 1024
        if layers == 2:
            embed = 2 * 2048 * 1024 * 2  # embedding and LM head, bf16
            layer_bytes = (total - embed - 1024 * 2) / 2
    assert peaks[16] <= peaks[2] + 1.5 * layer_bytes, (peaks, layer_bytes)


def test_a_transformers_without_its_conversion_mapping_is_one_line(checkpoint_dir, monkeypatch):
    """Streamed reading names checkpoint keys through transformers' 5.x conversion mapping: where that module is
    missing (another transformers), one line naming the fix, not an ImportError from inside."""
    import sys

    monkeypatch.setitem(sys.modules, "transformers.core_model_loading", None)  # import fails as if absent
    with pytest.raises(WsvdError, match="--stream maps checkpoint keys with transformers' conversion mapping.*--no-stream"):
        Checkpoint(checkpoint_dir)

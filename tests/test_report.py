"""`wsvd report DIR`: markdown and PNGs from a synthetic `wsvd compress --out` directory."""

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from wsvd_passes.artifacts.artifact import FORMAT_VERSION
from wsvd_passes.artifacts.report import write_report
from wsvd_passes.cli import main
from wsvd_passes.errors import WsvdError

HEADS = {"n_heads": 3, "n_kv_heads": 1, "head_dim": 8, "hidden_size": 24}
RANKS = {"0": {"q": [3, 5, 1], "k": [7], "v": [2]},
         "1": {"q": [8, 4, 6], "k": [3], "v": [5]},
         "2": {"q": [1, 1, 2], "k": [8], "v": [7]}}
TABLE = [{"recipe": "fp", "rho1": 1.0, "rho2": 1.0, "bits": "w16a16", "ppl": 17.25, "kl": 0.0, "top1": 1.0},
         {"recipe": "wsvd-noq", "rho1": 0.5, "rho1_achieved": 0.4987, "rho2": 0.3125, "bits": "w16a16",
          "ppl": 21.8731, "kl": 0.0421, "top1": 0.8765, "model": "tiny-llama-gqa"}]
PLOTS = ["ranks.png", "spectra.png", "reconstruction.png", "ratios.png"]


def _manifest(**overrides) -> dict:
    manifest = {
        "format": "wsvd-artifact", "format_version": 1, "wsvd_version": "0.1.0", "model": "tiny-llama-gqa",
        "recipe": {"name": "wsvd-noq", "granularity": "head", "scaling": "whiten", "allocation": "importance",
                   "finetune": True, "finetune_steps": 100},
        "bits": "w16a16", "rho1_target": 0.5, "rho1": 0.4987, "rho2": 0.3125,
        "rho1_per_layer": [0.4375, 0.6021, 0.4565], "rho2_per_layer": [0.5625, 0.5, 0.9375],
        "ranks": RANKS, "heads": HEADS,
        "reconstruction": {layer: {p: {"before_ft": 0.3 + 0.01 * i, "after": 0.2 + 0.01 * i}
                                   for i, p in enumerate("qkv")} for layer in RANKS},
        "calibration": {"source": "pydoc_data.topics:calibration", "windows": 4, "seq_len": 64, "sha256": "abc123"},
        "environment": {"torch": "2.13.0", "python": "3.12.1"},
        "finetune": {"loss_before": 1.5, "loss_after": 0.75}, "qat": None,
    }
    manifest.update(overrides)
    return {k: v for k, v in manifest.items() if v is not ...}


def _spectra() -> dict:
    rng = np.random.default_rng(0)
    tensors = {}
    for layer, projs in RANKS.items():
        for p, ranks in projs.items():
            for h, r in enumerate(ranks):
                before = np.sort(rng.uniform(0.01, 5.0, HEADS["head_dim"]))[::-1].astype(np.float32)
                tensors[f"layer{layer}.{p}.head{h}.before"] = before
                tensors[f"layer{layer}.{p}.head{h}.after"] = before[:r] * np.float32(0.9)
    return tensors


def _artifact(path, manifest=None, spectra=True, evaluation=TABLE):
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps(_manifest() if manifest is None else manifest))
    if spectra:
        save_file(_spectra(), str(path / "spectra.safetensors"))
    if evaluation is not None:
        (path / "evaluation.json").write_text(json.dumps(evaluation))
    return path


def _assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 300 and image.height >= 200
        assert len(set(image.convert("L").getdata())) > 10  # something was drawn


def test_full_report_has_plots_numbers_and_table(tmp_path):
    report = write_report(_artifact(tmp_path / "art"))
    assert report == tmp_path / "art" / "report.md"
    text = report.read_text()
    for name in PLOTS:
        _assert_png(tmp_path / "art" / name)
        assert f"]({name})" in text
    assert "# wsvd report: tiny-llama-gqa" in text
    for needle in ["| rho1 target | 0.5 |", "| rho1 achieved | 0.4987 |", "| rho2 | 0.3125 |", "| bits | w16a16 |",
                   "| recipe.granularity | head |", "| recipe.finetune | yes |", "| recipe.finetune_steps | 100 |",
                   "| sha256 | abc123 |", "| torch | 2.13.0 |", "| loss_after | 0.75 |",
                   "| 1 | 0.6021 | 0.5 |",  # per-layer rho1 / rho2
                   "QAT: none recorded"]:
        assert needle in text, needle
    evaluation = text.split("## Evaluation")[1]
    assert "| recipe | rho1 | rho1_achieved | rho2 | bits | ppl | kl | top1 | model |" in evaluation
    assert "| wsvd-noq | 0.5 | 0.4987 | 0.3125 | w16a16 | 21.87 | 0.0421 | 0.8765 | tiny-llama-gqa |" in evaluation
    assert "| fp | 1 | - |" in evaluation


def test_joint_granularity_eval_dict_and_out_dir(tmp_path):
    ranks = {str(i): {"qkv": [r], "q": [r], "k": [r], "v": [r]} for i, r in enumerate([17, 9, 23])}
    manifest = _manifest(recipe={"name": "qsvd-noq", "granularity": "joint"}, ranks=ranks,
                         reconstruction={layer: {"qkv": {"before_ft": 0.25, "after": 0.25}} for layer in ranks},
                         finetune=None)
    spectra = {f"layer{i}.qkv.{w}": np.linspace(4, 0.1, n, dtype=np.float32)
               for i, r in enumerate([17, 9, 23]) for w, n in (("before", 24), ("after", r))}
    art = _artifact(tmp_path / "art", manifest, spectra=False,
                    evaluation={"ppl": 31.4159, "nll": 3.447, "tokens": 189, "data": {"source": "x"}})
    save_file(spectra, str(art / "spectra.safetensors"))
    report = write_report(art, tmp_path / "out")
    assert report == tmp_path / "out" / "report.md" and not (art / "report.md").exists()
    for name in PLOTS:
        _assert_png(tmp_path / "out" / name)
    text = report.read_text()
    assert "| ppl | nll | tokens |" in text and "| 31.42 | 3.447 | 189 |" in text
    assert "| 2 | 0.25 | 0.25 |" in text  # per-layer reconstruction table, qkv only
    assert "Fine-tuning: none recorded" in text


def test_missing_sections_are_one_line_each(tmp_path):
    manifest = _manifest(reconstruction=..., finetune=..., qat=..., ranks=None, rho1_per_layer=...,
                         rho2_per_layer=...)
    report = write_report(_artifact(tmp_path / "art", manifest, spectra=False, evaluation=None))
    text = report.read_text()
    for line in ["Ranks: unavailable", "Spectra: unavailable", "Reconstruction error: unavailable",
                 "Per-layer rho1/rho2: unavailable", "Evaluation: unavailable", "Fine-tuning: none recorded"]:
        assert line in text, line
    assert not list((tmp_path / "art").glob("*.png"))


def test_cli_prints_report_path(tmp_path, capsys):
    art = _artifact(tmp_path / "art")
    assert main(["report", str(art), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "report.md")
    assert (tmp_path / "out" / "ranks.png").is_file()


@pytest.mark.parametrize("setup, message", [
    (lambda d: d.mkdir(), "has no manifest.json: give a directory written by `wsvd compress --out`"),
    (lambda d: None, "is not a directory"),
    (lambda d: _artifact(d, _manifest(format="something-else")),
     "is not a wsvd artifact manifest (format 'something-else')"),
    (lambda d: _artifact(d, [1, 2]), "is not a wsvd artifact manifest (format 'list')"),
    (lambda d: _artifact(d, _manifest(format_version=FORMAT_VERSION + 1)),
     f"has artifact format version {FORMAT_VERSION + 1} (written by wsvd-passes"),
    (lambda d: _artifact(d, _manifest(ranks={"0": {"q": ["x"]}})), "'ranks' is malformed"),
    (lambda d: _artifact(d, _manifest(reconstruction={"0": {"q": {"after": "big"}}})), "'reconstruction' is malformed"),
    (lambda d: _artifact(d, _manifest(heads=...)), "has ranks but no heads"),
    (lambda d: _artifact(d, evaluation="oops"), "evaluation.json is neither a list of table rows nor one result"),
    (lambda d: (_artifact(d), (d / "manifest.json").write_text("{not json")), "manifest.json is not valid JSON"),
    (lambda d: (_artifact(d, spectra=False), (d / "spectra.safetensors").write_bytes(b"junk")),
     "spectra.safetensors is not a readable safetensors file"),
])
def test_bad_directory_gives_one_error_line(tmp_path, capsys, setup, message):
    art = tmp_path / "art"
    setup(art)
    assert main(["report", str(art)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    with pytest.raises(WsvdError, match="wsvd"):
        write_report(art)


def test_pareto_plot_of_kl_against_cache_bytes(tmp_path):
    rows = [{"recipe": "fp", "rho2": 1.0, "bits": "w16a16", "kl": 0.0, "cache_bytes_per_token": 4096.0},
            {"recipe": "qsvd", "rho2": 0.5, "bits": "w8a8", "kl": 0.3, "cache_bytes_per_token": 1024.0},
            {"recipe": "wsvd", "rho2": 0.5, "bits": "w8a8", "kl": 0.2, "cache_bytes_per_token": 1100.0},
            {"recipe": "wsvd", "rho2": 0.7, "bits": "w8a8", "kl": 0.25, "cache_bytes_per_token": 1500.0},  # dominated
            {"recipe": "svd-llm", "rho2": 0.5, "bits": "w16a16", "kl": 0.5, "cache_bytes_per_token": 2048.0}]
    manifest = _manifest(heal={"calib_before": 0.5, "calib_after": 0.25})
    text = write_report(_artifact(tmp_path / "art", manifest, evaluation=rows)).read_text()
    _assert_png(tmp_path / "art" / "pareto.png")
    front = text.split("## KL vs cache size")[1]
    assert [line.split("|")[1].strip() for line in front.splitlines()
            if line.startswith("| ") and "recipe" not in line and "---" not in line] \
        == ["qsvd", "wsvd", "fp"]
    assert "| calib_after | 0.25 |" in text  # the healing report

"""The wsvd command line: results, JSON, and one-line errors."""

import json
import subprocess
import sys

import pytest

from wsvd_passes.cli import main


def test_eval_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--model", "tiny-llama-gqa", "--max-windows", "3", "--seq-len", "64", "--quiet", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["tokens"] == 3 * 63 and result["windows"] == 3
    assert result["data"]["source"] == "pydoc_data.topics:evaluation"
    assert f"{result['ppl']:.3f}" in printed


def test_eval_on_a_user_file(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "r.json"
    assert main(["eval", "--model", "tiny-llama", "--data", str(data), "--seq-len", "100", "--quiet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["data"]["source"] == str(data) and result["windows"] == 9


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["eval", "--model", "tiny-llama", "--data", "/nonexistent.txt"], "does not exist"),
    (["eval", "--model", "tiny-llama", "--max-windows", "0"], "--max-windows 0 must be at least 1"),
    (["eval"], "wsvd eval needs --model NAME|PATH (or --artifact DIR)"),
    (["compress", "--model", "tiny-llama", "--recipe", "nope", "--rho1", "0.5", "--out", "x"], "unknown recipe 'nope'"),
    (["compress", "--model", "tiny-llama", "--recipe", "wsvd", "--rho1", "1.5", "--out", "x"], "rho1 1.5 is outside (0, 1]"),
    (["compress", "--model", "tiny-llama", "--recipe", "wsvd-noq", "--rho1", "0.5", "--calib-windows", "1",
      "--seq-len", "32", "--out", "x"], "1 calibration window(s) are too few"),
    (["compress", "--model", "tiny-llama", "--recipe", "wsvd", "--rho1", "0.5", "--bits", "w3a3", "--out", "x"],
     "unknown bit setting 'w3a3'"),
    (["compress", "--model", "tiny-llama", "--recipe", "wsvd", "--rho1", "0.5", "--bits", "w4a4+mlp", "--out", "x"],
     "unknown 8-bit exception 'mlp'"),
    (["eval", "--artifact", "/nonexistent-dir"], "has no manifest.json"),
    (["generate", "--artifact", "/nonexistent-dir", "--recipe", "wsvd-noq", "--prompt", "x"], "not both"),
    *[([command, "--model", "tiny-llama", *extra, "--dtype", "int8"], "--dtype 'int8' is not supported")
      for command, extra in (("eval", []), ("table", []), ("generate", ["--prompt", "x"]),
                             ("compress", ["--recipe", "svd", "--rho1", "0.5", "--out", "x"]))],
    (["eval", "--model", "tiny-llama", "--device", "tpu"], "--device 'tpu' is not a device"),
])
def test_bad_input_gives_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_device_cuda_without_cuda_gives_one_line(command, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["bench", "decode", "--quick"] if command == "bench" else ["eval", "--model", "tiny-llama"]
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: no CUDA device") and err.count("\n") == 1


def test_eval_in_bfloat16_records_device_and_dtype(tmp_path):
    """bf16 perplexity of the same (rounded) tiny model is within 0.1% of float32 (measured: 0.01%)."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        assert main(["eval", "--model", "tiny-llama-gqa", "--max-windows", "2", "--seq-len", "32", "--device", "cpu",
                     "--dtype", dtype, "--quiet", "--json", str(out)]) == 0
        results[dtype] = json.loads(out.read_text())
    assert results["bfloat16"]["dtype"] == "bfloat16" and results["bfloat16"]["device"] == "cpu"
    assert results["bfloat16"]["ppl"] == pytest.approx(results["float32"]["ppl"], rel=1e-3)
    assert results["bfloat16"]["ppl"] != results["float32"]["ppl"]  # the model really ran in bf16


def _run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "wsvd_passes.cli", *argv], capture_output=True, text=True, timeout=300)


def test_non_decoder_checkpoint_is_refused_in_one_line(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                       image_size=8, patch_size=4)).save_pretrained(tmp_path)
    proc = _run_cli("sites", "--model", str(tmp_path), "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "holds a ViT model, which is not a causal language model" in proc.stderr


def test_decoder_without_rope_is_refused_in_one_line(tmp_path):
    from transformers import BertConfig, BertLMHeadModel

    BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=20, is_decoder=True)).save_pretrained(tmp_path)
    proc = _run_cli("sites", "--model", str(tmp_path), "--quiet")
    assert proc.returncode == 2 and "has no tokenizer files" in proc.stderr
    from wsvd_passes.models.registry import load_model

    load_model("tiny-llama").tokenizer.save_pretrained(tmp_path)
    proc = _run_cli("sites", "--model", str(tmp_path), "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "no rotate-half rotary embedding (RoPE) on the query path" in proc.stderr


def test_sites_command_lists_every_layer(capsys):
    assert main(["sites", "--model", "tiny-qwen2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[1].split()[2:6] == ["6", "2", "16", "96"]

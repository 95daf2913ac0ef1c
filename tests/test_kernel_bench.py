"""The kernel benchmark (wsvd_kernels.bench): a quick CPU run of the real Triton kernel under TRITON_INTERPRET=1,
its correctness gate with the kernel swapped for the PyTorch version (exact and perturbed), and bad arguments."""

import json
import os

import pytest

import wsvd_kernels.bench as bench
from wsvd_kernels.reference import latent_decode_attention_torch

TIMES = ("sdpa_ms", "latent_bf16_ms", "latent_int8_ms")


def _check_ok(result):
    assert json.loads(json.dumps(result)) == result
    assert result["copy_bandwidth_gbs"] is None and "smoke test" in result["timer"]
    (row,) = result["rows"]
    assert row["status"] == "ok" and row["note"] is None
    assert row["rank"] == 16 and 0 < row["rel_err"] <= bench.TOLERANCE
    for key in (*TIMES, "speedup_bf16", "speedup_int8", "sdpa_gbs", "latent_gbs", "latent_int8_gbs"):
        assert row[key] > 0, key
    return row


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton launcher refuses CPU tensors unless TRITON_INTERPRET=1")
def test_quick_cpu_run_of_the_triton_kernel(capsys):
    result = bench.bench_kernel(device="cpu", quick=True, progress=False)
    row = _check_ok(result)
    bench.print_kernel_table(result)
    table = capsys.readouterr().out
    assert "smoke test" in table and f"{row['seq_len']:>7}" in table and "  ok" in table


def test_correctness_gate(monkeypatch):
    """The PyTorch version of the op passes; one off by 5% is marked mismatch and not timed."""
    monkeypatch.setattr(bench, "latent_decode_attention_triton", latent_decode_attention_torch)
    _check_ok(bench.bench_kernel(device="cpu", quick=True, progress=False))

    monkeypatch.setattr(bench, "latent_decode_attention_triton",
                        lambda *args, **kwargs: latent_decode_attention_torch(*args, **kwargs) * 1.05)
    (row,) = bench.bench_kernel(device="cpu", quick=True, progress=False)["rows"]
    assert row["status"] == "mismatch" and "bf16 error" in row["note"] and "int8 error" in row["note"]
    assert row["sdpa_ms"] > 0 and row["latent_bf16_ms"] is None and row["speedup_int8"] is None
    assert row["rel_err"] > bench.TOLERANCE


@pytest.mark.parametrize("kwargs, message", [
    (dict(quick=True, shapes=bench.QUICK_SHAPES), "not both"),
    (dict(shapes=[dict(batch=1, heads=1, head_dim=8, seq_len=4)]), "lacks rank_ratio"),
    (dict(shapes=[dict(batch=1, heads=1, head_dim=7, seq_len=4, rank_ratio=0.5)]), "head_dim even"),
    (dict(shapes=[dict(batch=1, heads=1, head_dim=8, seq_len=4, rank_ratio=1.5)]), "rank_ratio must be"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench.bench_kernel(device="cpu", progress=False, **kwargs)

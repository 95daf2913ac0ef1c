"""GPU readiness without a GPU: every launch variant of the latent kernel (strided and paged), compiled for sm_90
on this CPU, uses the tensor cores, spills nothing and fits in shared memory; the roofline model meets the design
goals."""

import pytest

from wsvd_kernels.latent_attention import CONFIGS, MAX_RANK
from wsvd_kernels.roofline import dense_step, latent_step

static_check = pytest.importorskip("wsvd_kernels.static_check")
try:
    static_check._binder()
    BINDER = True
except RuntimeError:
    BINDER = False
needs_binder = pytest.mark.skipif(not BINDER, reason="this Triton release lacks the binder the static check uses")


@needs_binder
@pytest.mark.parametrize("ranks", [(45,), pytest.param(static_check.RANKS, marks=pytest.mark.slow)])
def test_every_variant_uses_tensor_cores_without_spills(ranks):
    """Every variant and autotuner configuration; the default run at rank 45 (the 64-column block, masked: the
    same tiles as rank 64 plus the masks), `-m slow` at every rank of ``static_check.RANKS``."""
    result = static_check.static_check(archs=(90,), ranks=ranks, progress=False)
    split = [r for r in result["rows"] if r["kernel"] == "split"]
    variants = {r["variant"] for r in split}
    assert variants == {v.name for v in static_check.VARIANTS}
    assert {r["rank"] for r in split} == {*ranks, MAX_RANK} and {r["block_n"] for r in split} == {
        c.kwargs["BLOCK_N"] for c in CONFIGS}
    for row in split:
        assert row["tensor_core"] > 0, row
    for row in result["rows"]:
        assert row["spills"] == 0 and row["stack"] == 0, row
        assert row["shared"] <= static_check.SMEM_LIMIT[90], row
    assert result["ok"]


@needs_binder
def test_the_check_sees_cuda_core_dots():
    """float32 latents run their dots in 'ieee' fp32, on the CUDA cores: the SASS has no tensor-core op
    (the check can fail)."""
    fp32 = static_check.Variant("fp32-g4", "float32", 4)
    result = static_check.static_check(archs=(90,), ranks=(64,), variants=(fp32,), progress=False)
    split = [r for r in result["rows"] if r["kernel"] == "split"]
    assert split and all(r["tensor_core"] == 0 and r["ffma"] > 0 for r in split) and not result["ok"]


def test_roofline_meets_the_design_goals():
    """B16/L8192/H32/D128, rho2 = 0.5 (r = 64): >= 1.9x dense SDPA with bf16 latents, >= 3.2x with int8,
    memory-bound; a joint latent of the same cache bytes is compute-bound and slower than dense."""
    b, h, d, length, r = 16, 32, 128, 8192, 64
    dense = dense_step(b, h, h, d, length)
    assert dense.bytes == pytest.approx(2 * b * h * length * d * 2, rel=1e-3)
    for gpu in ("H100 SXM", "H200 SXM"):
        bf16, int8 = (latent_step(b, h, h, d, length, r, r, kind) for kind in ("bf16", "int8"))
        assert dense.seconds(gpu) / bf16.seconds(gpu) >= 1.9 and bf16.bound(gpu) == "memory"
        assert dense.seconds(gpu) / int8.seconds(gpu) >= 3.2 and int8.bound(gpu) == "memory"
        joint = latent_step(b, h, h, d, length, 2 * h * r, 0, "bf16", joint=True)
        assert joint.bytes == pytest.approx(bf16.bytes, rel=0.05) and joint.bound(gpu) == "tensor"
        assert joint.seconds(gpu) > dense.seconds(gpu)

"""Device and dtype placement: the decode path never mixes devices; bf16 models match float32.

No GPU is needed. The device test runs the pipeline on fake tensors of a second device, where
fake-tensor propagation raises on any op that mixes it with the CPU (as CUDA does). That device
is PrivateUse1 set up as a Python backend, not CUDA: a CPU-only torch build cannot index
(``x[..., :k]``) a fake CUDA tensor, because Python indexing needs the CUDA device guard, and
Hugging Face models index inside their forward. Everything else is shared: our code names no
device type.
"""

from pathlib import Path

import pytest
import torch
from conftest import tiny_forward
from torch._subclasses.fake_tensor import FakeTensorMode

import lowering
from wsvd_passes.compression.calibration import InsertInputObservers
from wsvd_passes.compression.compress import calibrate, factor_plan
from wsvd_passes.compression.recipes import RECIPES, Recipe
from wsvd_passes.eval.generation import generate, reset_cache
from wsvd_passes.graph.capture import capture_decode, capture_forward
from wsvd_passes.graph.pipeline import Pipeline
from wsvd_passes.models.registry import load_model
from wsvd_passes.passes.factorize import FactorizeQKV
from wsvd_passes.passes.latent_kv import LatentKVCache
from wsvd_passes.passes.rotate import rotation_passes


class _AbsentDevice:
    """Backend module of the fake-only device: unavailable, so fake tensors never allocate on it."""

    def is_available(self) -> bool:
        return False

    def is_initialized(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def current_device(self) -> int:
        return 0

    def _is_in_bad_fork(self) -> bool:
        return False

    def manual_seed_all(self, seed: int) -> None:
        pass


def second_device() -> torch.device:
    """PrivateUse1 as a Python backend (registered once per process; fake tensors only)."""
    from torch.utils import backend_registration

    setup = getattr(backend_registration, "_setup_privateuseone_for_python_backend", None)
    if setup is None:
        pytest.skip(f"torch {torch.__version__} cannot register a Python backend for PrivateUse1")
    if not hasattr(torch, "privateuseone"):
        setup(backend_module=_AbsentDevice())
    return torch.device("privateuseone", 0)


def on_fake_device(model: torch.nn.Module, mode: FakeTensorMode, device: torch.device) -> torch.nn.Module:
    """Replace every parameter and buffer of ``model`` by a fake tensor of the same shape on ``device``."""
    with mode:
        return model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def graph_tensors_off(gm: torch.fx.GraphModule, device: torch.device) -> list[str]:
    """Names of the graph's parameters and buffers (scalars aside) that are not on ``device``."""
    tensors = [*gm.named_parameters(), *gm.named_buffers()]
    return [name for name, t in tensors if t.ndim > 0 and t.device != device]


def test_decode_path_never_mixes_devices():
    """Capture (forward with calibration observers, decode), factorise, rotate, cache latents, lower and
    generate on a second device: fake-tensor propagation raises on the first op that mixes devices."""
    device = second_device()
    recipe = RECIPES["wsvd-noft"]
    plan, _ = factor_plan(calibrate(tiny_forward("tiny-llama-gqa"), torch.randint(0, 384, (4, 40)), [recipe],
                                    progress=False), recipe, 0.6)  # real factors, made on the CPU
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = on_fake_device(load_model("tiny-llama-gqa").model, mode, device)
    with mode:
        forward = capture_forward(model)
        Pipeline([InsertInputObservers()])(forward)
        assert forward.gm(input_ids=torch.zeros(2, 5, dtype=torch.long, device=device)).device == device
        assert not graph_tensors_off(forward.gm, device)

        decoder = capture_decode(model, max_cache_len=16)
        assert decoder.device == device
        Pipeline([FactorizeQKV(plan), *rotation_passes(), LatentKVCache(decoder.config)])(decoder)
        lowering.lower(decoder)
        assert not graph_tensors_off(decoder.gm, device)
        tokens = generate(decoder, torch.tensor([[5, 7, 9]]), 2)  # the prompt may come from the CPU
    assert tokens.device == device and tokens.shape == (1, 5)


def test_vlm_capture_never_mixes_devices():
    device = second_device()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    lm = load_model("tiny-llava")
    model = on_fake_device(lm.model, mode, device)
    with mode:
        forward = capture_forward(model)
        embeds = forward.example_kwargs["inputs_embeds"]
        assert embeds.device == device and forward.gm(inputs_embeds=embeds).device == device
        decoder = capture_decode(model, max_cache_len=8)
        assert decoder.gm(**decoder.example_kwargs).device == device


# bf16 against float32 on the same (rounded) weights. bf16 keeps 8 significant bits, unit roundoff
# u = 2^-8; weights, activations, K/V latents, RoPE tables and matmul outputs are all rounded. The
# yardstick is the uncompressed model itself: its eager bf16 logits are about 7 u (of the logits'
# RMS) off its float32 logits on these tokens, and the lowered latent decode about 7.5 u. We allow
# the compressed bf16 path at most 2x the eager model's own bf16 error, and 16 u in absolute terms.
BF16_U = 2.0**-8


def _latent_lowered(lm, plan_recipe: Recipe, windows: torch.Tensor, cache_len: int):
    """Calibrate on ``lm``'s own forward graph, factorise its decode graph, cache latents, lower."""
    forward = capture_forward(lm.model)
    calib = calibrate(forward, windows, [plan_recipe], progress=False)
    plan, report = factor_plan(calib, plan_recipe, 0.6)
    decoder = capture_decode(lm.model, max_cache_len=cache_len)
    Pipeline([FactorizeQKV(plan), LatentKVCache(decoder.config)])(decoder)
    return lowering.lower(decoder), calib, report


def _decode_logits(decoder, ids: torch.Tensor) -> torch.Tensor:
    reset_cache(decoder)
    with torch.no_grad():
        return torch.cat([decoder.gm(input_ids=ids[:, t: t + 1], cache_position=torch.tensor([t], device=ids.device)).float()
                          for t in range(ids.shape[1])], 1)


def test_bf16_model_matches_float32():
    """Calibration statistics stay float64, factors and latent caches follow the model (bf16), and the
    lowered latent decode of the bf16 model matches the float32 one within the bf16 budget above."""
    recipe = Recipe("uniform-whitened-heads", "head", "whiten", "uniform")  # ranks do not depend on rounding
    windows = torch.randint(0, 384, (4, 48))
    ids = torch.randint(3, 300, (1, 12))
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        lm = load_model("tiny-llama-gqa", dtype=dtype)
        decoder, calib, report = _latent_lowered(lm, recipe, windows, cache_len=16)
        with torch.no_grad():
            eager = lm.model(ids).logits.float()
        runs[dtype] = (_decode_logits(decoder, ids), calib, report, decoder, eager)
    (ref, calib32, report32, _, eager32), (got, calib16, report16, decoder16, eager16) = runs.values()
    assert report16.ranks == report32.ranks
    assert all(s.qkv.gram.dtype == torch.float64 for s in calib16.stats)
    gram32, gram16 = calib32.stats[0].qkv.gram, calib16.stats[0].qkv.gram
    assert ((gram16 - gram32).norm() / gram32.norm()) < 16 * BF16_U
    caches = {n: b for n, b in decoder16.gm.named_buffers() if n.endswith("latent_cache")}
    assert caches and all(b.dtype == torch.bfloat16 for b in caches.values())
    assert got.isfinite().all()
    rms = ref.square().mean().sqrt()
    err, eager_err = (got - ref).abs().max(), (eager16 - eager32).abs().max()
    assert err < 16 * BF16_U * rms, f"max |bf16 - fp32| {err:.3g} exceeds 16 u x RMS {rms:.3g}"
    assert err < 2 * eager_err, f"max |bf16 - fp32| {err:.3g} exceeds twice the eager model's {eager_err:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compress_and_lowered_decode_match_cpu():
    """On a GPU: calibrate (statistics, gradients, Fisher fine-tuning), factorise, cache latents, lower
    and decode in float32 on CUDA (the Triton kernel); same ranks and logits as on the CPU."""
    recipe = RECIPES["wsvd-noq"]
    windows = torch.randint(0, 384, (4, 48))
    ids = torch.randint(3, 300, (1, 12))
    runs = {}
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        decoder, _, report = _latent_lowered(load_model("tiny-llama-gqa", device=device), recipe, windows, cache_len=16)
        assert not graph_tensors_off(decoder.gm, device)
        runs[device.type] = (_decode_logits(decoder, ids.to(device)).cpu(), report.ranks)
    assert runs["cuda"][1] == runs["cpu"][1]
    torch.testing.assert_close(runs["cuda"][0], runs["cpu"][0], atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_vlm_decoder_inputs_and_logits_match_cpu():
    """On a GPU: the vision tower runs on the model's device (processor outputs moved there) and the
    captured decoder gives the CPU's logits."""
    from wsvd_passes.eval.mm_data import load_items, prompt_inputs

    item = load_items(Path(__file__).parent / "data" / "mc_synthetic" / "data.jsonl")[0]
    logits = {}
    for device in ("cpu", "cuda"):
        lm = load_model("tiny-llava", device=device)
        with torch.no_grad():
            logits[device] = capture_forward(lm.model).gm(**prompt_inputs(lm, item).kwargs).cpu()
    torch.testing.assert_close(logits["cuda"], logits["cpu"], atol=1e-3, rtol=1e-3)

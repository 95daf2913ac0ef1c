"""End-to-end decode benchmark: tokens/s of a compiled decode step, dense KV cache vs latent cache.

A Llama-shaped language model with random weights (default: Llama-2-7B shapes) is
captured as a static-cache decode graph. The latent variant factors every q/k/v head
at a uniform rank ``round(rank_ratio * head_dim)`` (plain per-head SVD: random
weights need no calibration for a speed test), caches K/V latents and lowers
attention to ``wsvd::latent_attention``. Both steps are ``torch.compile``d and timed
over ``steps`` decode steps at cache positions ``start .. start + steps - 1``
(``start = cache_len - steps``, so attention reads a nearly full cache).
"""

from __future__ import annotations

import copy
import platform
import time

import torch

from wsvd_passes.capture import capture_decode
from wsvd_passes.compress import Calibration, factor_plan
from wsvd_passes.factorize import FactorizeQKV
from wsvd_passes.graph_utils import tensor_attr
from wsvd_passes.latent_kv import LatentKVCache
from wsvd_passes.lowrank import PROJECTIONS, make_scaling, split_groups
from wsvd_passes.pipeline import Pipeline
from wsvd_passes.recipes import Recipe
from wsvd_passes.sites import find_sites

from .compile import compile_step, lower

LLAMA2_7B = dict(layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32000)
QUICK = dict(layers=2, hidden=128, heads=4, kv_heads=2, intermediate=96, vocab=256)  # head dim 32: rank 16 stays aligned
_UNIFORM_HEADS = Recipe("uniform-head-svd", "head", "none", "uniform")


def _llama(shape: dict, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], max_position_embeddings=1 << 16)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def uniform_head_plan(decoder, rank_ratio: float):
    """Per-head factors of every q/k/v head at the uniform rank ``rank_ratio * head_dim`` (plain SVD)."""
    sites = find_sites(decoder.gm)
    groups = []
    for s in sites:
        weights = {p: tensor_attr(decoder.gm, getattr(s, f"{p}_proj").weight).detach().double().cpu() for p in PROJECTIONS}
        groups += split_groups(s.layer, weights, make_scaling(None, "none", s.hidden_size), "head", s.head_dim)
    rank = max(1, round(rank_ratio * sites[0].head_dim))
    # rho1 that makes floor(rho1 * E H / (E + H)) equal the requested rank
    E, H = sites[0].hidden_size, sites[0].head_dim
    calib = Calibration(sites, [], {("head", "none"): groups}, {}, {}, 0)
    plan, report = factor_plan(calib, _UNIFORM_HEADS, min(1.0, (rank + 0.5) * (E + H) / (E * H)))
    device, dtype = tensor_attr(decoder.gm, sites[0].q_proj.weight).device, tensor_attr(decoder.gm, sites[0].q_proj.weight).dtype
    for f in plan.values():
        f.downs = {k: v.to(device, dtype) for k, v in f.downs.items()}
        f.ups = {k: v.to(device, dtype) for k, v in f.ups.items()}
    return plan, report


def _time_steps(step, decoder, batch: int, start: int, steps: int, device: str) -> float:
    ids = torch.randint(0, 100, (batch, 1), device=device)
    positions = [torch.tensor([p], device=device) for p in range(start, start + steps)]
    with torch.no_grad():
        for p in positions[:3]:  # warm-up (compilation happens here)
            step(input_ids=ids, cache_position=p)
        if device == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        for p in positions:
            step(input_ids=ids, cache_position=p)
        if device == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - begin


def bench_decode(*, device: str, quick: bool = False, batch: int = 1, cache_len: int = 4096, steps: int = 32,
                 rank_ratio: float = 0.5, compile: bool = True, seed: int = 0) -> dict:
    """Tokens/s of the dense and the latent-cache decode step, measured in the same run."""
    shape = QUICK if quick else LLAMA2_7B
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = _llama(shape, device, dtype, seed)
    dense = capture_decode(model, batch_size=batch, max_cache_len=cache_len)
    latent = copy.deepcopy(dense)
    plan, report = uniform_head_plan(latent, rank_ratio)
    rewrite = LatentKVCache(latent.config)
    Pipeline([FactorizeQKV(plan), rewrite])(latent)
    lower(latent)
    start = cache_len - steps
    results = {}
    for name, decoder in (("dense", dense), ("latent", latent)):
        step = compile_step(decoder) if compile else decoder.gm
        seconds = _time_steps(step, decoder, batch, start, steps, device)
        results[name] = {"seconds": seconds, "tokens_per_s": batch * steps / seconds}
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "shape": shape, "batch": batch, "cache_len": cache_len, "steps": steps,
        "dtype": str(dtype), "rank_ratio": rank_ratio, "rho1": report.rho1, "rho2": report.rho2,
        "cache_bytes_dense": rewrite.bytes.dense, "cache_bytes_latent": rewrite.bytes.latent, "compiled": compile,
        "dense": results["dense"], "latent": results["latent"],
        "speedup": results["latent"]["tokens_per_s"] / results["dense"]["tokens_per_s"],
    }


def print_decode(result: dict) -> None:
    print(f"device {result['device']}, torch {result['torch']}, {result['dtype']}, batch {result['batch']}, "
          f"cache {result['cache_len']}, {result['steps']} steps, compiled={result['compiled']}")
    print(f"latent cache: rank ratio {result['rank_ratio']}, rho1 {result['rho1']:.3f}, rho2 {result['rho2']:.3f}, "
          f"{result['cache_bytes_latent'] / 2**20:.1f} MiB vs {result['cache_bytes_dense'] / 2**20:.1f} MiB dense")
    for name in ("dense", "latent"):
        print(f"  {name:<7}{result[name]['tokens_per_s']:>10.1f} tokens/s")
    print(f"  speedup {result['speedup']:.2f}x")

"""End-to-end decode benchmark: tokens/s of dense and latent-cache decode steps, checked before timing.

A Llama-shaped language model with random weights (default: Llama-2-7B shapes; ``layers`` of them)
has every q/k/v head factored at the uniform rank ``r = round(rank_ratio * head_dim)`` by plain
per-head SVD (random weights need no calibration for a speed test). The dense model's q/k/v
weights are then set to the products ``U_h D_h``, so that every variant computes the same function:

- dense ``hf-static-cache``: Hugging Face's static-cache decode step as captured (SDPA with a
  boolean mask over the whole cache, which keeps SDPA off its flash backend);
- dense ``sdpa-prefix``: the same graph with each attention replaced by mask-free SDPA over the
  written cache prefix ``K[:, :, :t+1]`` (flash on CUDA; the prefix length is a graph input that
  ``torch.compile`` makes dynamic after the first step);
- ``latent``: factored, K/V latents cached, attention lowered to ``wsvd::latent_attention``.

The faster dense variant is the baseline. Each step is ``torch.compile``d (or eager with
``compile=False``) and runs positions ``start .. cache_len - 1`` (``start = cache_len - steps``)
over caches prefilled with the same random content: latents C_K, C_V [B, n_kv, L, r] for the
latent cache, ``K = RoPE(C_K U_K^T)``, ``V = C_V U_V^T`` for the dense one. Before anything is
timed every variant's logits at every step are compared with those of ``hf-static-cache``:
``||logits - reference||_F / ||reference||_F <= CHECK_TOLERANCE[dtype]``. A variant over the
tolerance is reported and not timed.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch
from torch.fx import GraphModule

from wsvd_passes.algorithms.lowrank import PROJECTIONS, make_scaling, split_groups
from wsvd_passes.algorithms.rope import rope_parameters, rope_tables
from wsvd_passes.compression.compress import Calibration, factor_plan
from wsvd_passes.compression.recipes import Recipe
from wsvd_passes.graph.capture import CapturedGraph, capture_decode
from wsvd_passes.graph.factor_spec import head_blocks
from wsvd_passes.graph.graph_utils import tensor_attr
from wsvd_passes.graph.pipeline import Pipeline
from wsvd_passes.graph.sites import AttentionSite, find_sites
from wsvd_passes.models.registry import cast_parameters
from wsvd_passes.passes.factorize import FactorizeQKV, LayerFactors
from wsvd_passes.passes.latent_kv import LatentKVCache

from .compile import compile_step, lower

LLAMA2_7B = dict(layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32000)
QUICK = dict(layers=2, hidden=128, heads=4, kv_heads=2, intermediate=96, vocab=256)  # head dim 32: rank 16 stays aligned
# Relative Frobenius error of the logits over all checked steps: about 5 units of roundoff for the
# half precisions (bf16 u = 2^-8, fp16 u = 2^-11), 1e-4 for float32. Measured on the CPU (quick
# shapes, 4 layers, bf16): correct variants 0.005-0.007; dense caches 5% noisy 0.04; a head-mapping
# or rank bug 0.4-1.3. float32 variants agree to about 2e-7.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
REFERENCE = "hf-static-cache"
_UNIFORM_HEADS = Recipe("uniform-head-svd", "head", "none", "uniform")

Step = Callable[[int], torch.Tensor]  # step index -> logits [B, 1, V]


def _llama(shape: dict, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Random Llama of ``shape``, initialised in float32 and cast like ``from_pretrained`` (RoPE stays float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], max_position_embeddings=1 << 16)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        return cast_parameters(LlamaForCausalLM(config), dtype).eval()


def uniform_head_plan(decoder, rank_ratio: float):
    """Per-head factors of every q/k/v head at the uniform rank ``rank_ratio * head_dim`` (plain SVD)."""
    sites = find_sites(decoder.gm)
    weights, groups = {}, []
    for s in sites:
        weights[s.layer] = {p: tensor_attr(decoder.gm, getattr(s, f"{p}_proj").weight).detach().double().cpu()
                            for p in PROJECTIONS}
        groups += split_groups(s.layer, weights[s.layer], make_scaling(None, "none", s.hidden_size), "head", s.head_dim)
    rank = max(1, round(rank_ratio * sites[0].head_dim))
    # rho1 that makes floor(rho1 * E H / (E + H)) equal the requested rank
    E, H = sites[0].hidden_size, sites[0].head_dim
    calib = Calibration(sites, [], weights, {("head", "none"): [g.shapes_only() for g in groups]}, {}, {}, 0)
    plan, report = factor_plan(calib, _UNIFORM_HEADS, min(1.0, (rank + 0.5) * (E + H) / (E * H)))
    device, dtype = tensor_attr(decoder.gm, sites[0].q_proj.weight).device, tensor_attr(decoder.gm, sites[0].q_proj.weight).dtype
    for f in plan.values():
        f.downs = {k: v.to(device, dtype) for k, v in f.downs.items()}
        f.ups = {k: v.to(device, dtype) for k, v in f.ups.items()}
    return plan, report


def _use_products(decoder: CapturedGraph, sites: list[AttentionSite], plan: dict[int, LayerFactors]) -> None:
    """Overwrite the dense q/k/v weights with U D, so that dense and factored graphs compute the same function."""
    with torch.no_grad():
        for site in sites:
            f = plan[site.layer]
            for p in PROJECTIONS:
                weight = tensor_attr(decoder.gm, getattr(site, f"{p}_proj").weight)
                weight.copy_(f.ups[p].float() @ f.downs[p].float())


def prefix_sdpa_graph(dense: CapturedGraph, sites: list[AttentionSite]) -> GraphModule:
    """``gm(input_ids, cache_position, valid_len) -> (logits,)``: ``dense`` with every attention replaced by
    mask-free SDPA over the first ``valid_len`` cache positions. Shares the parameters and caches of ``dense``."""
    aten = torch.ops.aten
    graph = torch.fx.Graph()
    copies: dict = {}
    graph.output(graph.graph_copy(dense.gm.graph, copies))  # plain calling convention: no pytree specs
    with graph.inserting_after(graph.find_nodes(op="placeholder")[-1]):
        valid_len = graph.placeholder("valid_len")
    for site in sites:
        attention = copies[site.attention]
        with graph.inserting_before(attention):
            k, v = (graph.call_function(aten.slice.Tensor, (copies[cache.node], 2, 0, valid_len))
                    for cache in (site.k_cache, site.v_cache))
            out = graph.call_function(aten.scaled_dot_product_attention.default, (copies[site.q_rope.out], k, v),
                                      {"scale": site.scale, "enable_gqa": site.n_heads != site.n_kv_heads})
        attention.replace_all_uses_with(out)
    graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure(impure_random=False))
    graph.lint()
    return GraphModule(dense.gm, graph)


def latent_to_dense(latent: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Per-head up-projection of cached latents: [B, n_kv, L, r] x [n_kv, H, r] -> [B, n_kv, L, H]."""
    return torch.einsum("bglr,gdr->bgld", latent, up)


@torch.no_grad()
def _prefill(dense: GraphModule, dense_sites, latent: GraphModule, latent_sites, plan, config, seed: int) -> None:
    """Fill every cache with the same random content (see the module docstring), K and V at unit RMS.

    Latents go to the first r columns of each latent cache head (any padding stays zero)."""
    device = tensor_attr(dense, dense_sites[0].k_cache.buffer).device
    gen = torch.Generator(device).manual_seed(seed)  # on the device: the caches may hold gigabytes
    for d_site, l_site in zip(dense_sites, latent_sites):
        B, heads, L, H = tensor_attr(dense, d_site.k_cache.buffer).shape
        cos, sin = (t.to(device) for t in rope_tables(*rope_parameters(config), L))
        for p, dense_cache, latent_cache in (("k", d_site.k_cache, l_site.k_cache), ("v", d_site.v_cache, l_site.v_cache)):
            up = head_blocks(plan[l_site.layer].ups[p].float(), heads)
            c = torch.randn(B, heads, L, up.shape[-1], generator=gen, device=device)
            x = latent_to_dense(c, up)
            if p == "k":
                x = x * cos + torch.cat([-x[..., H // 2:], x[..., :H // 2]], -1) * sin
            scale = x.square().mean().rsqrt()
            target = tensor_attr(latent, latent_cache.buffer)
            target.zero_()
            target[..., : c.shape[-1]] = c * scale
            tensor_attr(dense, dense_cache.buffer).copy_(x * scale)


def _run(step: Step, steps: int) -> torch.Tensor:
    """Logits of every step, float32 [steps, B, V]."""
    with torch.no_grad():
        return torch.stack([step(i)[:, -1].float() for i in range(steps)])


def _compare(logits: torch.Tensor, reference: torch.Tensor, tolerance: float) -> dict:
    rel = float((logits - reference).norm() / reference.norm())
    return {"rel_err": rel, "max_abs_err": float((logits - reference).abs().max()),
            "token_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
            "passed": rel <= tolerance}


def _time(step: Step, steps: int, device: str) -> float:
    """Seconds for all steps, after three warm-up steps."""
    with torch.no_grad():
        for i in range(min(3, steps)):
            step(i)
        if device == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        for i in range(steps):
            step(i)
        if device == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - begin


def versions() -> dict:
    import transformers
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def bench_decode(*, device: str, quick: bool = False, layers: int | None = None, batch: int = 1, cache_len: int = 4096,
                 steps: int = 32, rank_ratio: float = 0.5, compile: bool = True, cuda_graphs: bool = False,
                 seed: int = 0, dtype: torch.dtype | None = None) -> dict:
    """Check, then time, the dense variants and the latent-cache decode step in the same run
    (``dtype`` default: float32 on the CPU, bfloat16 on CUDA). ``cuda_graphs``: every variant is
    compiled with ``mode="reduce-overhead"`` (CUDA-graph replays: no per-kernel launch cost)."""
    if cuda_graphs and (device != "cuda" or not compile):
        raise ValueError("cuda_graphs needs device cuda and compile=True")
    options = {"mode": "reduce-overhead"} if cuda_graphs else {}
    shape = dict(QUICK if quick else LLAMA2_7B, **({"layers": layers} if layers else {}))
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    model = _llama(shape, device, dtype, seed)
    dense = capture_decode(model, batch_size=batch, max_cache_len=cache_len)
    dense_sites = find_sites(dense.gm)
    plan, report = uniform_head_plan(dense, rank_ratio)
    _use_products(dense, dense_sites, plan)
    latent = dense.sharing_parameters()
    rewrite = LatentKVCache(latent.config)
    Pipeline([FactorizeQKV(plan), rewrite])(latent)
    latent_sites = find_sites(latent.gm)
    lower(latent)
    prefix = prefix_sdpa_graph(dense, dense_sites)
    _prefill(dense.gm, dense_sites, latent.gm, latent_sites, plan, dense.config, seed)

    start = cache_len - steps
    gen = torch.Generator().manual_seed(seed + 1)
    ids = [torch.randint(0, shape["vocab"], (batch, 1), generator=gen).to(device) for _ in range(steps)]
    positions = [torch.tensor([start + i], device=device) for i in range(steps)]
    dense_fn, latent_fn = (compile_step(d, **options) if compile else d.gm for d in (dense, latent))
    prefix_fn = torch.compile(prefix, fullgraph=True, **options) if compile else prefix  # valid_len becomes dynamic
    variants: dict[str, Step] = {
        REFERENCE: lambda i: dense_fn(input_ids=ids[i], cache_position=positions[i]),
        "sdpa-prefix": lambda i: prefix_fn(ids[i], positions[i], start + i + 1)[0],
        "latent": lambda i: latent_fn(input_ids=ids[i], cache_position=positions[i]),
    }

    tolerance = CHECK_TOLERANCE[dtype]
    reference = _run(variants[REFERENCE], steps)
    check = {REFERENCE: {"reference": True, "passed": bool(reference.isfinite().all())}}
    check.update({name: _compare(_run(variants[name], steps), reference, tolerance) for name in ("sdpa-prefix", "latent")})
    seconds = {name: _time(step, steps, device) for name, step in variants.items() if check[name]["passed"]}
    timed = {name: {"seconds": s, "tokens_per_s": batch * steps / s} for name, s in seconds.items()}
    dense_names = [n for n in (REFERENCE, "sdpa-prefix") if n in timed]
    baseline = max(dense_names, key=lambda n: timed[n]["tokens_per_s"]) if dense_names else None
    speedup = (timed["latent"]["tokens_per_s"] / timed[baseline]["tokens_per_s"]
               if baseline and "latent" in timed else None)
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "versions": versions(), "shape": shape, "batch": batch, "cache_len": cache_len, "steps": steps,
        "positions": [start, cache_len], "dtype": str(dtype), "rank_ratio": rank_ratio,
        "rank": report.ranks[0]["k"][0], "rho1": report.rho1, "rho2": report.rho2,
        "cache_bytes_dense": rewrite.bytes.dense, "cache_bytes_latent": rewrite.bytes.latent, "compiled": compile,
        "cuda_graphs": cuda_graphs,
        "check": {"tolerance": tolerance, "metric": "relative Frobenius error of the logits vs " + REFERENCE,
                  "variants": check},
        "correct": all(c["passed"] for c in check.values()),
        "dense_variants": {n: timed.get(n) for n in (REFERENCE, "sdpa-prefix")},
        "baseline": baseline, "dense": timed.get(baseline), "latent": timed.get("latent"), "speedup": speedup,
    }


def print_decode(result: dict) -> None:
    v = result["versions"]
    print(f"device {result['device']}; torch {v['torch']}, triton {v['triton']}, transformers {v['transformers']}")
    print(f"{result['dtype']}, {result['shape']['layers']} layers, batch {result['batch']}, cache {result['cache_len']}, "
          f"{result['steps']} steps at positions {result['positions'][0]}..{result['positions'][1] - 1}, "
          f"compiled={result['compiled']}")
    print(f"latent cache: rank {result['rank']} (ratio {result['rank_ratio']}), rho1 {result['rho1']:.3f}, "
          f"rho2 {result['rho2']:.3f}, {result['cache_bytes_latent'] / 2**20:.1f} MiB vs "
          f"{result['cache_bytes_dense'] / 2**20:.1f} MiB dense")
    check = result["check"]
    print(f"check ({check['metric']}, tolerance {check['tolerance']:g}):")
    for name, c in check["variants"].items():
        if c.get("reference"):
            print(f"  {name:<16} reference")
        else:
            verdict = "ok" if c["passed"] else "MISMATCH: not timed"
            print(f"  {name:<16} rel {c['rel_err']:.2e}  max {c['max_abs_err']:.2e}  "
                  f"tokens {100 * c['token_agreement']:.0f}%  {verdict}")
    print("tokens/s:")
    for name, t in [*((f"dense {n}", t) for n, t in result["dense_variants"].items()), ("latent", result["latent"])]:
        print(f"  {name:<23}{t['tokens_per_s']:>12.1f}" if t else f"  {name:<23}{'not timed':>12}")
    if result["speedup"] is not None:
        print(f"baseline: dense {result['baseline']} (the faster dense variant); latent speedup {result['speedup']:.2f}x")

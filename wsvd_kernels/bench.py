"""Decode-attention benchmark of the WSVD paper (Tables 5-7): dense SDPA against the fused latent kernel.

One new token per sequence attends to a full cache of L tokens, n heads of dim D (Llama-2-7B: n = 32,
D = 128, no GQA), rank r = round(ratio * D), bk, bv [n, r, D], q at position L - 1:

    baseline  SDPA(RoPE(q), K, V)                   K = RoPE(C_K @ bk), V = C_V @ bv, bf16 [B, n, L, D]
    ours      latent_decode_attention_triton(RoPE(q), C_K, bk, C_V, cos, sin)   -> [B, n, r], bf16 or int8 latents

Both timed steps include the query's RoPE (HF style, bf16); ours stops in latent space (bv folds into
o_proj). The latents are int8 with power-of-two scales per (token, head), so the bf16 latents
``int8 * scale`` are exact and one dense K/V built from them checks both variants:
``|ours @ bv - SDPA| <= TOLERANCE * max|SDPA|``. Effective bandwidth is the bytes each step must read
over its median time: ours C_K + C_V (+ scales) + bk + q, baseline K + V + q.

CUDA: ``triton.testing.do_bench`` median, which zeroes a 256 MB buffer before every timed run so
the caches are never read from L2 (``cuda_graphs``: ``do_bench_cudagraph``, each step replayed from a
CUDA graph, launch overhead excluded); SDPA pinned to the flash backend when it is available; the
rows' bandwidth also as a fraction of a device-to-device copy (bytes read + written over time). Each
row also carries the roofline prediction of :mod:`wsvd_kernels.roofline` for its shape. CPU
(``TRITON_INTERPRET=1``): ``time.perf_counter`` median, a smoke test of the code path only.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import triton
from tqdm.auto import tqdm

from wsvd_passes.algorithms.rope import rope_half_tables  # the model's own tables (one builder for passes and kernels)

from .latent_attention import (
    autotuned_split_kernel,
    default_num_splits,
    latent_decode_attention_triton,
    latent_split_kernel,
)
from .reference import rotate_half
from .roofline import dense_step, latent_step

DEFAULT_SHAPES = [dict(batch=b, heads=32, head_dim=128, seq_len=n, rank_ratio=ratio)
                  for b, n, ratio in itertools.product([4, 16, 64], [1024, 4096, 8192, 16384, 32768], [0.9, 0.7, 0.5])]
QUICK_SHAPES = [dict(batch=2, heads=4, head_dim=32, seq_len=64, rank_ratio=0.5)]
SHAPE_KEYS = ("batch", "heads", "head_dim", "seq_len", "rank_ratio")
TOLERANCE = 2e-2  # on max |error| / max |SDPA output|; the baseline's own bf16 rounding gives up to about half
MEMORY_FRACTION = 0.6  # of free GPU memory the resident caches may take
CPU_RUNS = 3
QUERY_STD = 2.0  # scores ~ N(0, ~2^2): peaked, not uniform
BF16 = torch.bfloat16
VARIANTS = {"sdpa": ("sdpa_ms", "sdpa_gbs", "sdpa_copy_frac"),  # step: its row keys (time, bandwidth, of copy)
            "bf16": ("latent_bf16_ms", "latent_gbs", "latent_copy_frac"),
            "int8": ("latent_int8_ms", "latent_int8_gbs", "latent_int8_copy_frac")}
MEASURED = (*(k for keys in VARIANTS.values() for k in keys), "speedup_bf16", "speedup_int8", "max_err", "rel_err")


def _rank(shape: dict) -> int:
    """r = round(rank_ratio * head_dim), at least 1."""
    return max(1, round(shape["rank_ratio"] * shape["head_dim"]))


def _check_shape(shape: dict) -> None:
    missing = [k for k in SHAPE_KEYS if k not in shape]
    if missing:
        raise ValueError(f"shape {shape} lacks {', '.join(missing)} (needs {', '.join(SHAPE_KEYS)})")
    if min(shape["batch"], shape["heads"], shape["seq_len"]) < 1 or shape["head_dim"] < 2 or shape["head_dim"] % 2:
        raise ValueError(f"shape {shape}: batch, heads, seq_len must be >= 1 and head_dim even")
    if not 0 < shape["rank_ratio"] <= 1:
        raise ValueError(f"shape {shape}: rank_ratio must be in (0, 1]")


def _resident_bytes(shape: dict) -> int:
    """Peak cache bytes of one shape: int8 C_K, C_V + float32 scales + bf16 dense K, V (bf16 latents
    replace K, V later and are smaller)."""
    tokens = shape["batch"] * shape["heads"] * shape["seq_len"]
    return tokens * (2 * _rank(shape) + 2 * 4 + 2 * 2 * shape["head_dim"])


def _read_bytes(shape: dict) -> dict[str, int]:
    """Bytes each step must read: its caches, q and (ours) bk; bf16 2 bytes, int8 1, scales float32."""
    b, n, d, length = (shape[k] for k in ("batch", "heads", "head_dim", "seq_len"))
    r, tokens = _rank(shape), b * n * length
    query, bk = b * n * d * 2, n * r * d * 2
    return {"sdpa": 2 * tokens * d * 2 + query,
            "bf16": 2 * tokens * r * 2 + bk + query,
            "int8": 2 * tokens * (r + 4) + bk + query}


def _int8_latents(shape: dict, rank: int, gen: torch.Generator, device: torch.device):
    """int8 [B, n, L, r] uniform in [-127, 127] and float32 scales [B, n, L] of 2^-6 or 2^-7."""
    size = (shape["batch"], shape["heads"], shape["seq_len"])
    c = torch.randint(-127, 128, (*size, rank), generator=gen, device=device, dtype=torch.int8)
    return c, torch.exp2(-torch.randint(6, 8, size, generator=gen, device=device).float())


def _bf16_latents(c: torch.Tensor, c_scale: torch.Tensor) -> torch.Tensor:
    """``c * scale`` in bf16, exact (7-bit integers times powers of two); one sequence at a time."""
    out = torch.empty(c.shape, dtype=BF16, device=c.device)
    for i in range(c.shape[0]):
        out[i] = c[i].to(BF16) * c_scale[i, ..., None]
    return out


def _dense_cache(c, c_scale, b, cos=None, sin=None) -> torch.Tensor:
    """bf16 [B, n, L, D] = (c * scale) @ b in float32, roped with cos, sin [L, D] when given."""
    out = torch.empty(*c.shape[:3], b.shape[-1], dtype=BF16, device=c.device)
    for i in range(c.shape[0]):  # one sequence at a time keeps the float32 temporaries small
        x = (c[i].float() * c_scale[i, ..., None]) @ b.float()
        out[i] = x if cos is None else x * cos + rotate_half(x) * sin
    return out


def _roped_query(q, cos, sin):
    """Hugging Face RoPE of the new token's query, in its dtype: q * cos + rotate_half(q) * sin."""
    return q * cos + rotate_half(q) * sin


def _sdpa_step(query, k, v, scale):
    """Baseline: [B, n, D] attention of the roped query over the dense cache."""
    return F.scaled_dot_product_attention(query()[:, :, None], k, v, scale=scale)[:, :, 0]


def _latent_step(query, bk, lengths, tables, scale, ck, cv, ck_scale=None, cv_scale=None):
    """Ours: [B, n, r] attention of the roped query over the latent cache."""
    return latent_decode_attention_triton(query(), ck, bk, cv, lengths, *tables, scale=scale,
                                          ck_scale=ck_scale, cv_scale=cv_scale)


def _cuda_median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _cuda_graph_median_ms(fn) -> float:
    fn()  # compile (and autotune) outside the graph capture
    with torch.cuda.stream(torch.cuda.Stream()):
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def _cpu_median_ms(fn) -> float:
    times = []
    for _ in range(CPU_RUNS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _check_and_time(step, bv, ref, atol, timer):
    """(max |step() @ bv - ref|, median ms or None when the error is above atol)."""
    err = (torch.einsum("bhr,hrd->bhd", step(), bv.float()) - ref).abs().max().item()
    return err, timer(step) if err <= atol else None


def _measure(shape: dict, device: torch.device, timer, sdpa_backend, seed: int = 0) -> dict:
    """Errors and median times of the three steps on one shape (see the module docstring)."""
    gen = torch.Generator(device).manual_seed(seed)
    b, n, d, length = (shape[k] for k in ("batch", "heads", "head_dim", "seq_len"))
    r, scale = _rank(shape), d**-0.5
    ck8, ck_scale = _int8_latents(shape, r, gen, device)
    cv8, cv_scale = _int8_latents(shape, r, gen, device)
    bk, bv = ((torch.randn(n, r, d, generator=gen, device=device) / math.sqrt(r)).to(BF16) for _ in range(2))
    q = (torch.randn(b, n, d, generator=gen, device=device) * QUERY_STD).to(BF16)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    tables = rope_half_tables(inv_freq, length)
    cos, sin = (torch.cat([t, t], dim=-1) for t in tables)
    query = functools.partial(_roped_query, q, cos[-1].to(BF16), sin[-1].to(BF16))  # position L - 1
    sdpa = functools.partial(_sdpa_step, query, _dense_cache(ck8, ck_scale, bk, cos, sin),
                             _dense_cache(cv8, cv_scale, bv), scale)
    del cos, sin
    with sdpa_backend():
        ref = sdpa().float()
        sdpa_ms = timer(sdpa)
    del sdpa  # frees the dense K, V before the latent steps
    out_scale = ref.abs().max().item()
    atol = TOLERANCE * out_scale
    lengths = torch.full((b,), length, dtype=torch.int32, device=device)
    latent = functools.partial(_latent_step, query, bk, lengths, tables, scale)
    err8, int8_ms = _check_and_time(functools.partial(latent, ck8, cv8, ck_scale, cv_scale), bv, ref, atol, timer)
    ck, cv = _bf16_latents(ck8, ck_scale), _bf16_latents(cv8, cv_scale)
    del ck8, cv8, ck_scale, cv_scale
    err16, bf16_ms = _check_and_time(functools.partial(latent, ck, cv), bv, ref, atol, timer)
    return {"ms": {"sdpa": sdpa_ms, "bf16": bf16_ms, "int8": int8_ms}, "err": {"bf16": err16, "int8": err8},
            "out_scale": out_scale, "atol": atol}


def _sdpa_backend(device: torch.device):
    """(name, context factory): SDPA's flash backend on CUDA where it is built, else its default choice."""
    if device.type == "cuda" and torch.backends.cuda.is_flash_attention_available():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return "flash", functools.partial(sdpa_kernel, SDPBackend.FLASH_ATTENTION)
    return "default", contextlib.nullcontext


def _copy_bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device copy of a 1 GiB buffer (less when memory is short): 2 * bytes / median time."""
    size = min(2**30, torch.cuda.mem_get_info(device)[0] // 4)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size / _cuda_median_ms(functools.partial(dst.copy_, src)) / 1e6



def parse_shape(text: str) -> dict:
    """``"B,H,D,L,ratio"`` (e.g. ``16,32,128,8192,0.5``) -> a shape dict; ValueError naming the format."""
    parts = text.split(",")
    try:
        if len(parts) != len(SHAPE_KEYS):
            raise ValueError
        shape = {k: (float if k == "rank_ratio" else int)(v) for k, v in zip(SHAPE_KEYS, parts)}
    except ValueError:
        raise ValueError(f"shape {text!r}: expected B,H,D,L,ratio (batch, heads, head dim, cache length, "
                         "rank / head dim), e.g. 16,32,128,8192,0.5") from None
    _check_shape(shape)
    return shape


def _predicted(shape: dict) -> dict:
    """Roofline speedups over dense SDPA on an H100 for this shape (wsvd_kernels.roofline)."""
    b, n, d, length = (shape[k] for k in ("batch", "heads", "head_dim", "seq_len"))
    dense = dense_step(b, n, n, d, length).seconds("H100 SXM")
    return {f"predicted_speedup_{v}": dense / latent_step(b, n, n, d, length, _rank(shape), _rank(shape), v)
            .seconds("H100 SXM") for v in ("bf16", "int8")}


def _bench_shape(shape: dict, device: torch.device, timer, sdpa_backend, copy_gbs: float | None,
                 sm_count: int) -> dict:
    """One row: the shape, its rank and the kernel's default split count, the roofline prediction, the
    measured figures, status and note."""
    row = {**{k: shape[k] for k in SHAPE_KEYS}, "rank": _rank(shape),
           "num_splits": default_num_splits(shape["batch"] * shape["heads"], shape["seq_len"], sm_count),
           **_predicted(shape), **dict.fromkeys(MEASURED), "status": "skipped", "note": None}
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        free, need = torch.cuda.mem_get_info(device)[0], _resident_bytes(shape)
        if need > MEMORY_FRACTION * free:
            row["note"] = f"caches need {need / 2**30:.1f} GiB > {MEMORY_FRACTION:.0%} of {free / 2**30:.1f} GiB free"
            return row
    try:
        m = _measure(shape, device, timer, sdpa_backend)
    except torch.OutOfMemoryError:
        row["note"] = "out of memory"
        return row
    read = _read_bytes(shape)
    for variant, (ms_key, gbs_key, frac_key) in VARIANTS.items():
        ms = m["ms"][variant]
        row[ms_key] = ms
        if ms is not None:
            row[gbs_key] = read[variant] / ms / 1e6
            row[frac_key] = None if copy_gbs is None else row[gbs_key] / copy_gbs
    for variant in ("bf16", "int8"):
        if m["ms"][variant] is not None:
            row[f"speedup_{variant}"] = m["ms"]["sdpa"] / m["ms"][variant]
    row["max_err"] = max(m["err"].values())
    row["rel_err"] = row["max_err"] / m["out_scale"]
    failed = [f"{v} error {e:.3g} > {m['atol']:.3g}" for v, e in m["err"].items() if e > m["atol"]]
    row["status"], row["note"] = ("mismatch", "; ".join(failed)) if failed else ("ok", None)
    return row


def bench_kernel(*, device: str, shapes: list[dict] | None = None, quick: bool = False, cuda_graphs: bool = False,
                 progress: bool = True) -> dict:
    """Benchmark SDPA on the dense cache against the latent kernel (bf16 and int8) on each shape.

    A shape is a dict of ``batch, heads, head_dim, seq_len, rank_ratio``; default :data:`DEFAULT_SHAPES`,
    ``quick`` one tiny shape (:data:`QUICK_SHAPES`, seconds under ``TRITON_INTERPRET=1``). Returns a
    JSON-serialisable dict: device, versions, SDPA backend, timer, tolerance, copy bandwidth (CUDA
    only) and one row per shape, with ``status`` ``ok``, ``mismatch`` (error above tolerance: that
    step is not timed) or ``skipped`` (resident caches above :data:`MEMORY_FRACTION` of free GPU
    memory, or out of memory).
    """
    if shapes is not None and quick:
        raise ValueError("give shapes or quick=True, not both")
    shapes = list(QUICK_SHAPES if quick else DEFAULT_SHAPES) if shapes is None else list(shapes)
    for shape in shapes:
        _check_shape(shape)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device {device!r}: the benchmark runs on cuda or cpu")
    cuda = dev.type == "cuda"
    if cuda_graphs and not cuda:
        raise ValueError("cuda_graphs needs a CUDA device")
    backend_name, sdpa_backend = _sdpa_backend(dev)
    with torch.cuda.device(dev) if cuda else contextlib.nullcontext():  # do_bench times the current device
        copy_gbs = _copy_bandwidth_gbs(dev) if cuda else None
        timer = (_cuda_graph_median_ms if cuda_graphs else _cuda_median_ms) if cuda else _cpu_median_ms
        sm_count = torch.cuda.get_device_properties(dev).multi_processor_count if cuda else 132
        rows = [_bench_shape(shape, dev, timer, sdpa_backend, copy_gbs, sm_count)
                for shape in tqdm(shapes, desc="kernel benchmark", disable=not progress)]
    kernels = compiled_kernels() if cuda else {}
    if cuda:
        name = torch.cuda.get_device_name(dev)
        timing = ("triton.testing.do_bench_cudagraph median (rep 100 ms, CUDA-graph replays)" if cuda_graphs else
                  "triton.testing.do_bench median (warmup 25 ms, rep 100 ms, L2 flushed before each run)")
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        timing = f"time.perf_counter median of {CPU_RUNS} runs on the CPU: a smoke test, not a performance figure"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "sdpa_backend": backend_name,
        "timer": timing,
        "tolerance": TOLERANCE,
        "copy_bandwidth_gbs": copy_gbs,
        "roofline": "predicted_speedup_*: wsvd_kernels.roofline bound on an H100 SXM (peak rates, not measured)",
        "kernels": kernels,
        "rows": rows,
    }


def compiled_kernels() -> dict:
    """What this process compiled and picked on the GPU: per compiled split kernel its warps, stages,
    registers, spills and shared memory (as loaded by the driver), and the autotuner's choice per key.
    Reads Triton's internal caches (checked with Triton 3.6/3.9); {} where they are not there."""
    try:
        compiled = [k for caches in latent_split_kernel.device_caches.values() for k in caches[0].values()]
        for k in compiled:
            k._init_handles()
        return {"compiled": [{"num_warps": k.metadata.num_warps, "num_stages": k.metadata.num_stages,
                              "shared": k.metadata.shared, "n_regs": k.n_regs, "n_spills": k.n_spills}
                             for k in compiled],
                "autotuned": {str(key): str(config) for key, config in autotuned_split_kernel.cache.items()}}
    except (AttributeError, TypeError, IndexError):  # noqa: BLE001 - internal API of another Triton release
        return {}


def _fmt(value, spec: str, width: int) -> str:
    """value right-aligned in width, "-" for None."""
    return f"{'-' if value is None else format(value, spec):>{width}}"


def print_kernel_table(result: dict) -> None:
    """Print the device, the copy bandwidth and one line per shape; GB/s = bytes read / median time."""
    copy = result["copy_bandwidth_gbs"]
    print(f"{result['device']}; torch {result['torch']}, triton {result['triton']}, "
          f"SDPA backend {result['sdpa_backend']}")
    print(f"timing: {result['timer']}")
    print("device-to-device copy: " + ("not measured" if copy is None else
                                       f"{copy:.0f} GB/s (read + write); (%) = fraction of it"))
    print("(roof): the roofline model's bf16 and int8 speedups on an H100 (wsvd_kernels.roofline), not measured")
    print(f"{'B':>4}{'heads':>6}{'D':>5}{'L':>7}{'ratio':>6}{'r':>5}{'sdpa ms':>10}{'bf16 ms':>10}{'int8 ms':>10}"
          f"{'x bf16':>8}{'x int8':>8}{'(roof)':>14}{'sdpa GB/s':>16}{'bf16 GB/s':>16}{'int8 GB/s':>16}{'rel err':>9}"
          "  status")
    for row in result["rows"]:
        line = (f"{row['batch']:>4}{row['heads']:>6}{row['head_dim']:>5}{row['seq_len']:>7}{row['rank_ratio']:>6.2f}"
                f"{row['rank']:>5}")
        line += "".join(_fmt(row[VARIANTS[v][0]], ".4g", 10) for v in VARIANTS)
        line += _fmt(row["speedup_bf16"], ".2f", 8) + _fmt(row["speedup_int8"], ".2f", 8)
        line += f"{row['predicted_speedup_bf16']:>7.2f}{row['predicted_speedup_int8']:>7.2f}"
        for _, gbs_key, frac_key in VARIANTS.values():
            gbs, frac = row[gbs_key], row[frac_key]
            text = "-" if gbs is None else f"{gbs:.4g}" + ("" if frac is None else f" ({frac:.0%})")
            line += f"{text:>16}"
        line += _fmt(row["rel_err"], ".1e", 9) + f"  {row['status']}" + (f": {row['note']}" if row["note"] else "")
        print(line)

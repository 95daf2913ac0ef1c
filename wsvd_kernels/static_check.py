"""GPU checks without a GPU: compile every launch variant of the latent kernel for a CUDA target and read its SASS.

Each variant is one specialisation the op can launch: latent dtype (bf16, fp16, int8 with bf16 dots),
GQA group G (1: the GEMV path; 4: tensor-core score and value dots), a shared latent (joint/per-projection
factors: head stride 0), the paged variant (latents read from vLLM pages of PAGE_SIZE tokens through a block
table, entries of an odd width: no alignment to specialise on), the rank r (64, and 45: not a multiple of 16;
shared latents also at the kernel's largest, MAX_RANK), times every autotuner
configuration for the target (:func:`wsvd_kernels.latent_attention.configs_for`). The arguments are meta tensors of the target
shape, specialised by Triton's own binder exactly as a launch would (dtypes, 16-byte alignment,
divisibility of strides and sizes), then ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))`` and the wheel's ``cuobjdump`` give, per variant:

- ``tensor_core``: HMMA/HGMMA/IMMA instructions in the SASS (0 means the dots run on the CUDA cores);
- ``spills``: LDL/STL instructions (local memory), and ``stack`` bytes per thread;
- ``registers`` per thread and ``shared`` memory per program (bytes).

Needs Triton's private binder (``create_function_from_signature``, ``JITFunction._pack_args``): checked
with Triton 3.9; other releases get a one-line error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton

from .latent_attention import (
    INTERPRETED,
    MAX_RANK,
    configs_for,
    kernel_arguments,
    latent_split_kernel,
    merge_splits_kernel,
    paged_kernel_arguments,
)

ARCHS = (90,)
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # largest shared memory per block (H100/H200, A100)
RANKS = (64, 45)
HEAD_DIM = 128
SHAPE = dict(batch=16, n_kv=32, max_len=8192)  # WSVD Table 5-7 decode shape (Llama-2-7B attention)
PAGE_SIZE = 16  # vLLM's default block size on CUDA


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    latent: str  # "bfloat16", "float16", "float32" or "int8" (with bf16 q, bk and dots)
    group: int  # query heads per kv head
    shared: bool = False  # one latent read by every kv head (expanded view, head stride 0)
    extra_ranks: tuple = ()  # checked besides RANKS
    paged: bool = False  # read from pages through a block table (vLLM's latent cache)

    @property
    def compute(self) -> torch.dtype:
        return {"float16": torch.float16, "float32": torch.float32}.get(self.latent, torch.bfloat16)


VARIANTS = (Variant("bf16-g1", "bfloat16", 1), Variant("bf16-g4", "bfloat16", 4), Variant("fp16-g4", "float16", 4),
            Variant("int8-g1", "int8", 1), Variant("int8-g4", "int8", 4),
            Variant("shared-bf16-g1", "bfloat16", 1, True, (MAX_RANK,)),
            Variant("paged-bf16-g4", "bfloat16", 4, paged=True), Variant("paged-int8-g1", "int8", 1, paged=True),
            Variant("paged-int8-g4", "int8", 4, paged=True))


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _binder():
    try:
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:  # noqa: BLE001 - private API of Triton
        raise RuntimeError(f"the static check needs Triton's binder (checked with Triton 3.9), this is "
                           f"Triton {triton.__version__}: {e}") from e
    return make_backend, create_function_from_signature


def variant_call(variant: Variant, rank: int, *, head_dim: int = HEAD_DIM, batch: int = SHAPE["batch"],
                 n_kv: int = SHAPE["n_kv"], max_len: int = SHAPE["max_len"]):
    """Meta-tensor arguments of one op call of this variant: the launcher's own kernel_arguments() (paged:
    paged_kernel_arguments(), entries of every head's k and v channels, int8 scales, and one spare column)."""
    meta = dict(device="meta")
    dt = variant.compute
    latent_heads = 1 if variant.shared else n_kv
    latent_dtype = torch.int8 if variant.latent == "int8" else dt
    q, bk = (torch.empty(batch, n_kv * variant.group, head_dim, dtype=dt, **meta),
             torch.empty(n_kv, rank, head_dim, dtype=dt, **meta))
    tables = (torch.empty(max_len, head_dim // 2, **meta), torch.empty(max_len, head_dim // 2, **meta))
    if variant.paged:
        entry = 2 * latent_heads * (rank + (4 if variant.latent == "int8" else 0)) + 1
        blocks = max_len // PAGE_SIZE
        return paged_kernel_arguments(
            q, torch.empty(batch * blocks, PAGE_SIZE, entry, dtype=latent_dtype, **meta),
            torch.empty(batch, blocks, dtype=torch.int32, **meta), torch.empty(batch, dtype=torch.int64, **meta), bk,
            torch.empty(6, n_kv, dtype=torch.int32, **meta), *tables, max_len=max_len, width_v=rank,
            scale=head_dim**-0.5)

    def latent():
        c = torch.empty(batch, latent_heads, max_len, rank, dtype=latent_dtype, **meta)
        return c.expand(batch, n_kv, max_len, rank)

    ck, cv = latent(), latent()
    scales = {}
    if variant.latent == "int8":
        scales = {n: torch.empty(batch, latent_heads, max_len, **meta).expand(batch, n_kv, max_len)
                  for n in ("ck_scale", "cv_scale")}
    return kernel_arguments(q, ck, bk, cv, torch.empty(batch, dtype=torch.int64, **meta), *tables,
                            scale=head_dim**-0.5, **scales)


def compile_kernel(fn, args: tuple, kwargs: dict, arch: int):
    """Compile the Triton JIT function ``fn`` for sm_<arch> as a launch with these arguments would."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    make_backend, create_function_from_signature = _binder()
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def sass_report(kernel) -> dict:
    """Tensor-core and spill instruction counts, registers, stack and shared memory of a compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout

    def count(*ops):
        return sum(len(re.findall(rf"\b{op}(?:\.|\s)", sass)) for op in ops)

    resources = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {"tensor_core": count("HMMA", "HGMMA", "IMMA"), "hgmma": count("HGMMA"), "ffma": count("FFMA"),
            "spills": count("LDL", "STL"), "registers": int(resources.get("REG", 0)),
            "stack": int(resources.get("STACK", 0)) + int(resources.get("LOCAL", 0)),
            "shared": int(kernel.metadata.shared)}


def check_variant(variant: Variant, rank: int, config: triton.Config, arch: int) -> dict:
    """One row: the variant, rank, configuration, target and its SASS figures."""
    grid, args, constexprs, *_ = variant_call(variant, rank)
    start = time.perf_counter()
    kernel = compile_kernel(latent_split_kernel, args, {**constexprs, **config.kwargs, "num_warps": config.num_warps,
                                                         "num_stages": config.num_stages}, arch)
    return {"kernel": "split", "variant": variant.name, "rank": rank, "arch": f"sm_{arch}",
            "block_n": config.kwargs["BLOCK_N"], "num_warps": config.num_warps, "num_stages": config.num_stages,
            "single_split": constexprs["SINGLE_SPLIT"], **sass_report(kernel),
            "compile_s": round(time.perf_counter() - start, 2)}


def check_merge(rank: int, arch: int, num_splits: int = 4) -> dict:
    """The split-merging kernel (no dots: tensor_core is 0 by design)."""
    out = torch.empty(2, 4, rank, device="meta")
    parts = torch.empty(2, 4, num_splits, rank, device="meta"), *(torch.empty(2, 4, num_splits, device="meta")
                                                                  for _ in range(2))
    kernel = compile_kernel(merge_splits_kernel, (*parts, out, num_splits),
                            dict(R_V=rank, BLOCK_S=triton.next_power_of_2(num_splits),
                                 BLOCK_RV=triton.next_power_of_2(rank), num_warps=4, num_stages=1), arch)
    return {"kernel": "merge", "variant": "merge", "rank": rank, "arch": f"sm_{arch}", **sass_report(kernel)}


def static_check(archs=ARCHS, ranks=RANKS, variants=VARIANTS, progress: bool = True) -> dict:
    """Every (variant, rank, configuration, arch) of the split kernel and the merge kernel per rank/arch.

    Under TRITON_INTERPRET=1 (CI) the kernels were decorated for the interpreter, which cannot compile:
    the check then runs in a fresh Python process without it.
    """
    from tqdm.auto import tqdm

    if INTERPRETED:
        return _in_subprocess(archs, ranks, variants, progress)
    jobs = [(v, r, c, a) for a in archs for v in variants for r in (*ranks, *v.extra_ranks)
            for c in configs_for(a, triton.next_power_of_2(r))]
    rows = [check_variant(*job) for job in tqdm(jobs, desc="compiling kernel variants", disable=not progress)]
    rows += [check_merge(r, a) for a in archs for r in ranks]
    failing = [r for r in rows if r["spills"] or (r["kernel"] == "split" and not r["tensor_core"])
               or r["shared"] > SMEM_LIMIT.get(int(r["arch"][3:]), SMEM_LIMIT[80])]
    return {"triton": triton.__version__, "shape": {**SHAPE, "head_dim": HEAD_DIM}, "rows": rows,
            "ok": not failing}


def _in_subprocess(archs, ranks, variants, progress: bool) -> dict:
    spec = json.dumps({"archs": list(archs), "ranks": list(ranks), "variants": [dataclasses.asdict(v) for v in variants],
                       "progress": progress})
    code = ("import json, sys; from wsvd_kernels.static_check import Variant, static_check; a = json.loads(sys.argv[1]); "
            "r = static_check(a['archs'], a['ranks'], [Variant(**{**v, 'extra_ranks': tuple(v['extra_ranks'])}) "
            "for v in a['variants']], a['progress']); print('\\n' + json.dumps(r))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, env=env)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the static check failed in its subprocess: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_static(result: dict) -> None:
    print(f"static check: Triton {result['triton']}, shape {result['shape']}")
    print(f"{'kernel':<7}{'variant':<16}{'r':>4}{'arch':>7}{'BLOCK_N':>8}{'warps':>6}{'stages':>7}{'TC':>6}"
          f"{'HGMMA':>6}{'FFMA':>6}{'spills':>7}{'stack':>6}{'regs':>5}{'smem KB':>8}")
    for r in result["rows"]:
        print(f"{r['kernel']:<7}{r['variant']:<16}{r['rank']:>4}{r['arch']:>7}{r.get('block_n', '-'):>8}"
              f"{r.get('num_warps', '-'):>6}{r.get('num_stages', '-'):>7}{r['tensor_core']:>6}{r['hgmma']:>6}"
              f"{r['ffma']:>6}{r['spills']:>7}{r['stack']:>6}{r['registers']:>5}{r['shared'] / 1024:>8.1f}")
    print("every split variant uses the tensor cores, nothing spills, shared memory fits" if result["ok"] else
          "FAILED: a split variant without tensor-core instructions, or spills, or too much shared memory (above)")

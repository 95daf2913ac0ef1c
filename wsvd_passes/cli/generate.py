"""``wsvd generate``: text through the (compressed, lowered, compiled) decode graph."""

from __future__ import annotations

import tempfile
import time

from ..errors import WsvdError
from .common import (
    add_calibration,
    add_device,
    add_model,
    bits_of,
    check_runtime,
    int8_runtime,
    load_lm,
    require_text_model,
    run_environment,
)
from .compress import compress_to


def add_parser(sub) -> None:
    ge = sub.add_parser("generate", help="generate text through the (compressed, lowered, compiled) decode graph")
    add_model(ge)
    add_device(ge)
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
    add_calibration(ge)
    ge.add_argument("--json", dest="json_out", help="also write the result to this JSON file")
    ge.set_defaults(run=cmd_generate)


def cmd_generate(args) -> dict:
    import torch

    from ..eval.generation import cache_buffers, generate
    from ..graph.capture import capture_decode
    from ..graph.pipeline import Pipeline
    from ..passes.latent_kv import LatentKVCache

    if args.max_new_tokens < 1:
        raise WsvdError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.artifact and args.recipe:
        raise WsvdError("give --artifact DIR or --recipe NAME, not both")
    if args.recipe:
        bits = bits_of(args)
        check_runtime(args, {"recipe": {"name": args.recipe}, "bits": bits.name})
    if args.artifact:
        from ..artifacts.artifact import load, read_manifest

        manifest = read_manifest(args.artifact)
        check_runtime(args, manifest)
        lm = load_lm(args, args.model or manifest["model"])
    elif args.recipe:  # the whole recipe, as compress runs it, replayed on the decode graph as an artifact is
        from ..artifacts.artifact import load

        args.grad_samples = args.grad_samples or min(args.calib_windows, 16)
        scratch = tempfile.TemporaryDirectory(prefix="wsvd-generate-")
        lm, manifest = compress_to(args, scratch.name)
        args.artifact = scratch.name
    else:
        check_runtime(args, None)
        lm = load_lm(args, args.model)
    require_text_model(lm, "eval --mc data.jsonl --generate N")
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
    path += int8_runtime(args, decoder)
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
            "dtype": args.dtype, "environment": run_environment()}

"""``wsvd eval``: perplexity (and KL, top-1 against the uncompressed model with --artifact) on text, or
multiple-choice image questions for a VLM (--mc)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import WsvdError
from .common import (
    add_device,
    add_model,
    check_runtime,
    int8_runtime,
    load_artifact,
    load_lm,
    require_text_model,
    run_environment,
)


def add_parser(sub) -> None:
    ev = sub.add_parser("eval", help="perplexity of a model on the evaluation text")
    add_model(ev)
    add_device(ev)
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
    ev.set_defaults(run=cmd_eval)


def cmd_eval(args) -> dict:
    from ..artifacts.artifact import read_manifest
    from ..eval.data import text_source, token_windows
    from ..eval.evaluation import evaluate
    from ..graph.capture import capture_forward

    if args.mc:
        return _eval_multiple_choice(args)
    if args.max_windows is not None and args.max_windows < 1:
        raise WsvdError(f"--max-windows {args.max_windows} must be at least 1")
    check_runtime(args, args.artifact and read_manifest(args.artifact))
    if args.artifact:
        art = load_artifact(args)
        lm, compressed = art.model, art.captured
    else:
        lm, compressed = load_lm(args, args.model), None
    require_text_model(lm, "eval --mc data.jsonl")
    runtime = int8_runtime(args, compressed)
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
           "windows": len(windows), **result.as_dict(), "seconds": round(seconds, 2), "environment": run_environment(),
           "device": str(captured.device), "dtype": args.dtype, "runtime": runtime or args.runtime}
    if runtime:
        print(f"[runtime: {runtime}]")
    if args.artifact:  # `wsvd report DIR` shows it
        (Path(args.artifact) / "evaluation.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def _eval_multiple_choice(args) -> dict:
    """Accuracy on multiple-choice image questions, uncompressed and (with --artifact) compressed side by side."""
    from ..eval.data import text_source
    from ..eval.mm_data import load_items, sample_items
    from ..eval.multiple_choice import compare, prepare
    from ..graph.capture import capture_forward

    if args.generate < 0:
        raise WsvdError(f"--generate {args.generate} must be at least 0")
    items = sample_items(load_items(args.mc), args.max_items, args.seed)
    if args.artifact:
        art = load_artifact(args)
        lm, models = art.model, {"compressed": art.captured}
    else:
        lm, models = load_lm(args, args.model), {}
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
            "environment": run_environment()}

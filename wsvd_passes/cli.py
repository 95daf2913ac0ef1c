"""The ``wsvd`` command line.

    wsvd eval  --model NAME|PATH [--data FILE] [--json OUT]   perplexity on the evaluation text
    wsvd sites --model NAME|PATH                              the attention sites found in the graph

Problems with the input print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

from .errors import WsvdError


def _add_model(p: argparse.ArgumentParser) -> None:
    from .models import MODEL_NAMES

    p.add_argument("--model", required=True, help=f"one of {', '.join(MODEL_NAMES)} or a local checkpoint directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsvd", description="Low-rank and low-bit attention compression as graph passes.")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="perplexity of a model on the evaluation text")
    _add_model(ev)
    ev.add_argument("--data", help="plain-text file to evaluate on (default: evaluation half of pydoc_data.topics)")
    ev.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    ev.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--json", dest="json_out", help="also write the results to this JSON file")

    si = sub.add_parser("sites", help="list the attention sites found in the captured graph")
    _add_model(si)
    return parser


def _environment() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
            "python": platform.python_version()}


def cmd_eval(args) -> dict:
    from .capture import capture_forward
    from .data import text_source, token_windows
    from .evaluation import evaluate
    from .models import load_model

    if args.max_windows is not None and args.max_windows < 1:
        raise WsvdError(f"--max-windows {args.max_windows} must be at least 1")
    lm = load_model(args.model)
    text, provenance = text_source(args.data, "evaluation")
    windows = token_windows(lm.tokenizer, text, args.seq_len, args.max_windows)
    captured = capture_forward(lm.model)
    start = time.perf_counter()
    result = evaluate(lambda ids: captured.gm(input_ids=ids), windows, batch_size=args.batch_size, progress=not args.quiet)
    seconds = time.perf_counter() - start
    print(f"{'model':<16}{'data':<32}{'windows':>8}{'tokens':>9}{'ppl':>10}")
    print(f"{lm.name[-16:]:<16}{provenance['source'][-32:]:<32}{len(windows):>8}{result.tokens:>9}{result.ppl:>10.3f}")
    return {"model": lm.name, "data": provenance, "seq_len": args.seq_len, "windows": len(windows),
            **result.as_dict(), "seconds": round(seconds, 2), "environment": _environment()}


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
    import os

    import torch

    if not torch.cuda.is_available():  # torchao's optional .so files are CUDA-only kernels
        os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    logging.getLogger("torchao").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="While compiling, we found certain side effects")
    if quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries(getattr(args, "quiet", False))
    try:
        result = {"eval": cmd_eval, "sites": cmd_sites}[args.command](args)
        if getattr(args, "json_out", None):
            Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    except WsvdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

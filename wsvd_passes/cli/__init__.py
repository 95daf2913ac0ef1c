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

One module per command (``eval.py``, ``sites.py``, ``compress.py``, ``table.py``, ``generate.py``, ``bench.py``,
``report.py``, ``export.py``), each with ``add_parser(sub)`` (its subcommand and flags, ``args.run``) and the
command; ``common.py`` holds the options and steps they share.
eval, compress, table and generate take --device cuda|cpu and --dtype bfloat16|float16|float32.
Problems with the input print one ``error:`` line and exit with status 2; a benchmark whose
variants disagree exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import WsvdError
from . import bench, compress, eval, export, generate, report, sites, table
from .common import quiet_libraries

COMMANDS = (eval, sites, compress, table, generate, bench, report, export)  # one module each, in --help order


def parser() -> argparse.ArgumentParser:
    """The ``wsvd`` argument parser: each command module adds its subcommand (``add_parser``), which sets
    ``args.run`` to the command."""
    p = argparse.ArgumentParser(prog="wsvd", description="Low-rank and low-bit attention compression as graph passes.")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_libraries(getattr(args, "quiet", False))
    try:
        if hasattr(args, "model") and not args.model and not getattr(args, "artifact", None):
            raise WsvdError(f"wsvd {args.command} needs --model NAME|PATH" +
                            (" (or --artifact DIR)" if hasattr(args, "artifact") else ""))
        result = args.run(args)
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

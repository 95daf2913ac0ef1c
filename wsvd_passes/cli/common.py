"""Options and steps shared by the ``wsvd`` commands: model and device flags, calibration, ratios, bits,
the run environment."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import time
import warnings

from ..errors import WsvdError


def add_model(p: argparse.ArgumentParser) -> None:
    from ..models.registry import MODEL_NAMES

    p.add_argument("--model", help=f"one of {', '.join(MODEL_NAMES)} or a local checkpoint directory "
                   "(with --artifact: defaults to the model recorded in it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cuda (default when available) or cpu: where the model runs")
    p.add_argument("--dtype", default="float32", help="model weights and activations: bfloat16, float16 or float32 "
                   "(default); statistics, Grams, gradients and SVDs stay float32/float64")


def add_heal(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heal-steps", type=int, default=None, metavar="N",
                   help="heal the factors for N steps over the calibration windows: end to end on KL(dense || "
                   "compressed); with --stream, per layer on its output error against the dense layer (on by default "
                   "in wsvd-heal and wsvd-heal-noq; any factor recipe)")
    p.add_argument("--heal-windows", type=int, default=None, metavar="N",
                   help="end-to-end healing trains on the first N windows of the calibration text (default: the "
                   "recipe's, 192 for wsvd-heal-noq; else the calibration windows); text calibration only")


def with_heal(args, recipes: list):
    """``recipes`` with --heal-steps applied (refused for recipes without factors)."""
    steps, windows = getattr(args, "heal_steps", None), getattr(args, "heal_windows", None)
    if windows is not None:
        if windows < 2:
            raise WsvdError(f"--heal-windows {windows} must be at least 2 (one is held back for validation)")
        recipes = [dataclasses.replace(r, heal_windows=windows) for r in recipes]
    if steps is None:
        return recipes
    if steps < 1:
        raise WsvdError(f"--heal-steps {steps} must be at least 1")
    plain = [r.name for r in recipes if not r.factor]
    if plain:
        raise WsvdError(f"--heal-steps: recipe {plain[0]} has no low-rank factors to heal (quantisation only): "
                        "use a factor recipe such as wsvd-heal or wsvd-heal-noq")
    return [dataclasses.replace(r, heal_steps=steps) for r in recipes]


def add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-data", help="calibration text file (default: calibration half of pydoc_data.topics)")
    p.add_argument("--calib-windows", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--calib", help="image-text calibration data for a VLM (JSONL: image, question, answer)")
    p.add_argument("--calib-samples", type=int, default=None, help="with --calib: N items drawn with --calib-seed")
    p.add_argument("--calib-seed", type=int, default=0, help="with --calib --calib-samples: the sampling seed")
    p.add_argument("--grad-samples", type=int, default=None, help="windows used for gradients (default: all)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")


def run_environment() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
            "python": platform.python_version()}


def load_lm(args, name: str):
    """The model ``name`` on ``--device`` in ``--dtype``."""
    from ..device import parse_device, parse_dtype
    from ..models.registry import load_model

    return load_model(name, device=parse_device(args.device), dtype=parse_dtype(args.dtype))


def load_artifact(args, **kwargs):
    """The artifact of ``--artifact`` rebuilt on the base model loaded with :func:`load_lm`."""
    from ..artifacts.artifact import load, read_manifest

    return load(args.artifact, model=load_lm(args, args.model or read_manifest(args.artifact)["model"]), **kwargs)


def check_runtime(args, manifest: dict | None) -> None:
    """--runtime int8 needs a compressed model with W8A8 linears (checked before any work)."""
    if getattr(args, "runtime", "fake") != "int8":
        return
    if not manifest:
        raise WsvdError("--runtime int8 runs a compressed model's W8A8 linears in integers: give --artifact DIR "
                        "(or, for generate, --recipe NAME --bits w8a8)")
    from ..algorithms.quantize import parse_bits

    bits = parse_bits(manifest["bits"])
    if (bits.weight, bits.activation) != (8, 8) and bits.embedding != 8:
        raise WsvdError(f"--runtime int8: {manifest['recipe']['name']} {manifest['bits']} has no W8A8 linears or "
                        "8-bit embedding (int8 execution covers 8-bit weights with 8-bit activations, and e8 tables; "
                        "other widths stay simulated): drop --runtime int8")


def int8_runtime(args, graph) -> str:
    """--runtime int8: the graph's W8A8 linears rewritten to ``lowering.int8.int8_linear`` in place; what ran how."""
    if getattr(args, "runtime", "fake") != "int8":
        return ""
    from lowering.int8 import lower_int8

    counts = lower_int8(graph)
    tables = f", {counts['int8_embedding']} int8 embedding table(s)" if counts["int8_embedding"] else ""
    return f", {counts['int8']} W8A8 linears in int8 (torch._int_mm){tables}, {counts['simulated']} simulated"


def require_text_model(lm, instead: str) -> None:
    if lm.processor is not None:
        raise _takes_text(lm.name, instead)


def _takes_text(name: str, instead: str) -> WsvdError:
    return WsvdError(f"{name} is a vision-language model and this command takes text: use `wsvd {instead}`")


def quiet_libraries(quiet: bool) -> None:
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


def prepare(args, recipe_names: list[str]):
    """Load --model, cut the calibration windows, capture and calibrate for ``recipe_names``: (lm, captured graph,
    calibration, recipes, provenance)."""
    from ..compression.compress import calibrate
    from ..compression.memory import WHOLE_MODEL_MMAP_THRESHOLD, bound_heap, own_weights
    from ..compression.recipes import get_recipe
    from ..eval.data import text_source, token_windows
    from ..eval.mm_data import image_text_samples
    from ..graph.capture import capture_forward

    bound_heap(WHOLE_MODEL_MMAP_THRESHOLD)  # the whole model's stages free large temporaries (see bound_heap)
    recipes = with_heal(args, [get_recipe(n.strip()) for n in recipe_names])
    for flag in ("calib_windows", "grad_samples", "eval_windows"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise WsvdError(f"--{flag.replace('_', '-')} {value} must be at least 1")
    lm = load_lm(args, args.model)
    own_weights(lm.model)  # passes replacing weights free them (see own_weights)
    if lm.processor is not None or getattr(args, "calib", None):
        if getattr(args, "heal_windows", None) is not None:
            raise WsvdError("--heal-windows cuts text windows: image-text calibration heals on its samples, drop it")
        windows, provenance = image_text_calibration(args, lm.name, lm.processor is not None,
                                                     functools.partial(image_text_samples, lm))
        heal_windows = None
    else:
        text, provenance = text_source(args.calib_data, "calibration")
        windows = token_windows(lm.tokenizer, text, args.seq_len, args.calib_windows)
        n_heal = max((r.heal_windows for r in recipes if r.heal_steps), default=0)
        heal_windows = token_windows(lm.tokenizer, text, args.seq_len, n_heal) if n_heal else None
    captured = capture_forward(lm.model)
    start = time.perf_counter()
    calib = (calibrate(captured, windows, recipes, grad_samples=args.grad_samples, progress=not args.quiet)
             if any(r.factor for r in recipes) else None)
    if calib is not None and heal_windows is not None:
        calib.heal_windows = heal_windows
        provenance.update(heal_windows=len(heal_windows))
    provenance.update(windows=len(windows), seq_len=args.seq_len, grad_samples=calib.samples if calib else 0,
                      seconds=round(time.perf_counter() - start, 1))
    return lm, captured, calib, recipes, provenance


def image_text_calibration(args, name: str, vlm: bool, samples_of):
    """Labelled image-text samples of --calib for the model ``name`` (``vlm``: whether it is a vision-language model),
    made by ``samples_of(items)``, and their provenance."""
    from ..eval.data import text_source
    from ..eval.mm_data import load_items, sample_items

    if not vlm:
        raise WsvdError(f"--calib takes image-text data, but {name} is a text-only model: use --calib-data FILE.txt")
    if args.command in ("table", "generate"):
        raise _takes_text(name, "compress --calib data.jsonl, then eval --mc")
    if not args.calib:
        raise WsvdError(f"{name} is a vision-language model: give image-text calibration data with --calib data.jsonl")
    items = sample_items(load_items(args.calib), args.calib_samples, args.calib_seed)
    provenance = text_source(args.calib, "calibration")[1]
    provenance.update(items=[i.id for i in items], seed=args.calib_seed)
    return samples_of(items), provenance


def bits_of(args):
    from ..algorithms.quantize import parse_bits

    return parse_bits(getattr(args, "bits", "w16a16"))


def parse_ratios(text: str, flag: str) -> list[float]:
    """The values of ``--rho1``/``--rho2`` (comma-separated), each checked to lie in (0, 1]."""
    from ..algorithms.rank_allocation import check_rho2

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


def ratio_targets(args, *, single: bool) -> list[tuple[float | None, float | None]]:
    """(rho1, rho2) points of --rho1 and --rho2: every pair; a missing flag is None (at least one is needed)."""
    rho2 = getattr(args, "rho2", None)
    if args.rho1 is None and rho2 is None:
        if single:
            raise WsvdError(f"wsvd {args.command} needs --rho1 and/or --rho2 (kept fraction of Q/K/V parameters, "
                            "of the K+V cache)")
        args.rho1 = "0.9,0.8,0.7,0.6,0.5"
    rho1s = parse_ratios(args.rho1, "rho1") if args.rho1 is not None else [None]
    rho2s = parse_ratios(rho2, "rho2") if rho2 is not None else [None]
    if single and len(rho1s) * len(rho2s) > 1:
        raise WsvdError(f"wsvd {args.command} takes one --rho1 and one --rho2 value, not lists")
    return [(r1, r2) for r2 in rho2s for r1 in rho1s]


def tuned_recipe(args, captured, calib, recipe, rho1, bits, rho2=None):
    """``recipe`` with QSVD's beta tuned on calibration windows when --tune-beta applies to it."""
    from ..compression.compress import tune_beta

    if not (getattr(args, "tune_beta", False) and recipe.factor and recipe.quantize):
        return recipe, None
    tuned, losses = tune_beta(captured, calib, recipe, rho1, bits, rho2=rho2)
    if not args.quiet:
        print(f"{recipe.name}: beta {tuned.beta} (calibration loss per beta: "
              f"{', '.join(f'{b}: {v:.4f}' for b, v in losses.items())})", flush=True)
    return tuned, {str(b): v for b, v in losses.items()}

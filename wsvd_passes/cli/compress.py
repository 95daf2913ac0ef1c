"""``wsvd compress``: calibrate, run one recipe and save the artifact, whole-model or streamed
(one decoder layer at a time, :mod:`wsvd_passes.compression.stream`)."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

from ..errors import WsvdError
from .common import (
    add_calibration,
    add_device,
    add_heal,
    add_model,
    bits_of,
    prepare,
    ratio_targets,
    run_environment,
    tuned_recipe,
    with_heal,
)


def add_parser(sub) -> None:
    co = sub.add_parser("compress", help="compress Q/K/V with one recipe and save the result")
    add_model(co)
    add_device(co)
    co.add_argument("--recipe", required=True, help="see `wsvd_passes.compression.recipes` (svd, asvd, svd-llm, qsvd-noq, wsvd-noft, wsvd-noq)")
    co.add_argument("--rho1", help="kept fraction of Q/K/V parameters, in (0, 1]")
    co.add_argument("--rho2", help="kept fraction of the K+V cache, in (0, 1] (alone, or with --rho1: both budgets)")
    co.add_argument("--out", required=True, help="output directory")
    add_calibration(co)
    co.add_argument("--bits", default="w16a16", help="w8a8, w4a4, w8a4, w4a8 or w16a16 for quantising recipes; append e8 or e4 "
                    "to also quantise the embedding and LM head (weight-only, per row), e.g. w8a8e8; for activations below 8 bits, "
                    "cC clips them at C x their per-token range and +NAME keeps inputs at 8 bits (NAME: qkv, o_proj, "
                    "gate_up, down_proj, latent or layerN, layer-1 the last), e.g. w4a4c0.9+down_proj+layer0")
    co.add_argument("--tune-beta", action="store_true",
                    help="tune QSVD's beta (Sigma split) of quantising factor recipes on 8 calibration windows")
    add_heal(co)
    co.add_argument("--json", dest="json_out", help="also write the report to this JSON file")
    co.add_argument("--save-dtype", default="bfloat16",
                    help="storage type of the weights that are not quantised: bfloat16 (default), float16 or float32")
    co.add_argument("--save-pt2", action="store_true", help="also write model.pt2 (torch.export.save)")
    co.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                    help="one decoder layer in memory at a time, read from the checkpoint directory's safetensors (the "
                    "low-rank recipes, quantised or not; healing per layer; a VLM's language decoder, its --calib samples "
                    "through the vision tower once each). Default: on when the whole-model mode would not "
                    "fit in the available memory, which is then said in one line; --no-stream forces the whole model")
    co.add_argument("--offload-dir", help="streamed (implies --stream): where per-layer activations, statistics and "
                    "Fisher wait between passes (default: a folder in --out)")
    co.add_argument("--resume", action="store_true", help="streamed (implies --stream): continue a killed run of the "
                    "same model, recipe and calibration from its last finished layer")
    co.set_defaults(run=cmd_compress)


def cmd_compress(args) -> dict:
    if args.stream is None:
        args.stream = bool(args.resume or args.offload_dir) or _stream_by_default(args)
    _, manifest = compress_to(args, args.out, keep_model=False)
    print(f"{manifest['recipe']['name']} {manifest['bits']}: rho1 {manifest['rho1']:.3f} "
          f"rho2 {manifest['rho2']:.3f} -> {args.out}")
    return manifest


def compress_to(args, out: str, *, keep_model: bool = True):
    """Calibrate, run the whole recipe (--recipe, --rho1, --bits) and save the artifact to ``out``: (the loaded
    uncompressed model, manifest). ``keep_model=False`` returns None for the model and compresses the capture in
    place (unless the recipe heals against it), freeing the dense weights and the calibration as the passes go."""
    from ..artifacts.artifact import dense, save
    from ..compression.compress import compress
    from ..compression.memory import release_memory
    from ..device import parse_dtype

    save_dtype = parse_dtype(getattr(args, "save_dtype", "bfloat16"), "--save-dtype")  # bad input fails before work
    if getattr(args, "stream", False):
        if getattr(args, "heal_windows", None) is not None:
            raise WsvdError("--heal-windows is for end-to-end healing; streamed healing is per layer on the "
                            "calibration windows: drop it or add --no-stream")
        return None, _compress_streamed(args, out, save_dtype)
    if getattr(args, "resume", False) or getattr(args, "offload_dir", None):
        raise WsvdError("--resume and --offload-dir belong to streamed compression: add --stream")

    ((rho1, rho2),) = ratio_targets(args, single=True)
    bits = bits_of(args)
    lm, captured, calib, (recipe,), provenance = prepare(args, [args.recipe])
    recipe, _ = tuned_recipe(args, captured, calib, recipe, rho1, bits, rho2)
    name = str(Path(lm.name).resolve()) if Path(lm.name).is_dir() else lm.name  # a path that still works elsewhere
    base = dense(captured)
    if not keep_model:
        lm = None  # the eager model shares the capture's dense weights
    compressed, report = compress(captured, calib, recipe, rho1, bits, rho2=rho2, progress=not args.quiet,
                                  in_place=not (keep_model or recipe.heal_steps))
    del calib, captured  # a copy's calibration and dense capture: the artifact is packed in their place
    release_memory()
    manifest = save(out, model=name, base=base, compressed=compressed, recipe=recipe, bits=bits,
                    rho1_target=rho1 if recipe.factor else None, report=report, calibration=provenance,
                    environment=run_environment(), save_dtype=save_dtype, save_pt2=getattr(args, "save_pt2", False))
    return lm, manifest


def _stream_by_default(args) -> bool:
    """Whether ``compress`` streams without --stream/--no-stream: when --model is a safetensors checkpoint directory
    whose whole-model compression would need more than the available memory (said in one line on stderr)."""
    from ..compression.checkpoint import Checkpoint, available_memory, whole_model_need
    from ..compression.recipes import get_recipe
    from ..device import parse_dtype

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
    (recipe,) = with_heal(args, [get_recipe(args.recipe)])
    healing = "; healing per layer on its output error, not end to end" if recipe.heal_steps else ""
    print(f"compressing layer by layer (--stream): {sizes}{healing}; --no-stream forces the whole model",
          file=sys.stderr)
    return True


def _stream_refusal(args) -> str | None:
    """Why ``compress`` cannot stream with these arguments (one line naming the fix), or None."""
    from ..compression.recipes import get_recipe
    from ..compression.stream import unstreamable

    ratio_targets(args, single=True)  # --rho1 and/or --rho2, one value each
    if not Path(args.model).is_dir():
        return f"--stream reads a checkpoint directory; {args.model} is not one (save it with save_pretrained)"
    if args.tune_beta:
        return "--stream compresses with the recipe's own beta: drop --tune-beta"
    return unstreamable(get_recipe(args.recipe), bits_of(args))


def _compress_streamed(args, out: str, save_dtype: torch.dtype) -> dict:
    """``compress --stream``: the checkpoint directory --model compressed layer by layer (:mod:`wsvd_passes.compression.stream`),
    calibrated on text windows (a causal LM) or on --calib image-text samples through the eager front (a VLM)."""
    import transformers

    from ..compression.checkpoint import Checkpoint
    from ..compression.recipes import get_recipe
    from ..compression.stream import compress_checkpoint, front_samples
    from ..device import parse_dtype
    from ..eval.data import text_source, token_windows
    from .common import image_text_calibration

    if (refusal := _stream_refusal(args)) is not None:
        raise WsvdError(refusal)
    ((rho1, rho2),) = ratio_targets(args, single=True)
    bits = bits_of(args)
    if args.calib_windows < 1 or (args.grad_samples is not None and args.grad_samples < 1):
        raise WsvdError("--calib-windows and --grad-samples must be at least 1")
    checkpoint = Checkpoint(args.model, parse_dtype(args.dtype))
    if checkpoint.vlm or args.calib:
        data, provenance = image_text_calibration(args, args.model, checkpoint.vlm,
                                                  functools.partial(front_samples, checkpoint))
    else:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError) as e:
            raise WsvdError(f"cannot read the tokenizer in {args.model}: {str(e).splitlines()[0]}") from None
        text, provenance = text_source(args.calib_data, "calibration")
        data = token_windows(tokenizer, text, args.seq_len, args.calib_windows)
    provenance.update(windows=len(data), seq_len=args.seq_len)
    (recipe,) = with_heal(args, [get_recipe(args.recipe)])
    return compress_checkpoint(args.model, data, recipe, rho1, bits, out, rho2=rho2, dtype=parse_dtype(args.dtype),
                               grad_samples=args.grad_samples, offload_dir=args.offload_dir, resume=args.resume,
                               calibration=provenance, environment=run_environment(),
                               save_dtype=save_dtype, progress=not args.quiet)

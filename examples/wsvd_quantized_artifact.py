"""The full WSVD recipe through the Python API: per-head factors, rotations, learnable S2 with
local QAT and W8A8 fake quantisation, composed as passes; then save the artifact, reload it
(identical logits) and report.

    python examples/wsvd_quantized_artifact.py [--model tiny-llama-gqa] [--rho1 0.5] [--out runs/example]
"""

import argparse
import copy

import torch

import wsvd_passes
from wsvd_passes import Pipeline, capture_forward, load_model
from wsvd_passes.algorithms.quantize import parse_bits
from wsvd_passes.artifacts.artifact import dense, save
from wsvd_passes.artifacts.report import write_report
from wsvd_passes.compression.compress import calibrate, factor_plan, recipe_passes
from wsvd_passes.compression.recipes import RECIPES
from wsvd_passes.eval.data import pydoc_text, token_windows
from wsvd_passes.eval.evaluation import evaluate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-llama-gqa")
    parser.add_argument("--rho1", type=float, default=0.5)
    parser.add_argument("--bits", default="w8a8")
    parser.add_argument("--out", default="runs/example")
    args = parser.parse_args()

    lm = load_model(args.model)
    base = capture_forward(lm.model)
    recipe, bits = RECIPES["wsvd"], parse_bits(args.bits)
    windows = token_windows(lm.tokenizer, pydoc_text("calibration"), 128, max_windows=8)
    calib = calibrate(base, windows, [recipe])  # stats, importance, Fisher, and F' in the rotated basis
    plan, report = factor_plan(calib, recipe, args.rho1)
    passes = recipe_passes(recipe, bits, plan, calib.qat_targets, progress=True)
    print("passes:", " -> ".join(type(p).__name__ for p in passes))
    compressed = copy.deepcopy(base)
    Pipeline(passes)(compressed)

    save(args.out, model=args.model, base=dense(base), compressed=compressed, recipe=recipe, bits=bits,
         rho1_target=args.rho1, report=report, calibration={"windows": len(windows)}, environment={})
    reloaded = wsvd_passes.load(args.out).captured
    ids = token_windows(lm.tokenizer, pydoc_text("evaluation"), 128, max_windows=4)
    with torch.no_grad():
        same = torch.equal(reloaded.gm(input_ids=ids), compressed.gm(input_ids=ids))
    result = evaluate(lambda x: reloaded.gm(input_ids=x), ids, reference=lambda x: base.gm(input_ids=x))
    print(f"rho1 {report.rho1:.3f} rho2 {report.rho2:.3f} | ppl {result.ppl:.2f} (uncompressed {result.ref_ppl:.2f}) "
          f"KL {result.kl:.4f} top-1 {result.top1:.3f} | reload identical: {same}")
    print("report:", write_report(args.out))


if __name__ == "__main__":
    main()

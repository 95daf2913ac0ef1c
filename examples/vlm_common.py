"""Shared flow of the per-family VLM examples: capture the language decoder, calibrate on
image-text data, compress, then score multiple-choice image questions side by side.

Run one of ``examples/vlm_<family>.py`` (tiny random config by default, or ``--model PATH``
for a local checkpoint with its processor).
"""

import argparse
from pathlib import Path

from wsvd_passes import capture_forward, load_model
from wsvd_passes.algorithms.quantize import parse_bits
from wsvd_passes.compression.compress import calibrate, compress
from wsvd_passes.compression.recipes import RECIPES
from wsvd_passes.eval.mm_data import image_text_samples, load_items, sample_items
from wsvd_passes.eval.multiple_choice import compare, prepare

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "mc_synthetic" / "data.jsonl"


def run(default_model: str) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=default_model)
    parser.add_argument("--recipe", default="wsvd-noq")
    parser.add_argument("--rho1", type=float, default=0.6)
    parser.add_argument("--data", default=str(DATA), help="JSONL with image, question, options, answer")
    args = parser.parse_args()

    lm = load_model(args.model)
    captured = capture_forward(lm.model)  # language decoder + lm_head: inputs_embeds -> logits
    items = load_items(args.data)
    calib = image_text_samples(lm, sample_items(items, 4, seed=0))  # answer-only labels
    recipe = RECIPES[args.recipe]
    compressed, report = compress(captured, calibrate(captured, calib, [recipe], progress=False), recipe, args.rho1,
                                  parse_bits("w8a8"))
    if report is not None:
        print(f"{recipe.name}: rho1 {report.rho1:.3f}, rho2 {report.rho2:.3f}")
    results = compare({"uncompressed": lambda kw: captured.gm(**kw), "compressed": lambda kw: compressed.gm(**kw)},
                      prepare(lm, items))
    for name, r in results.items():
        print(f"{name:<13} accuracy {r['accuracy']:.3f} on {r['total']} items (agreement {r['agreement']:.3f})")
    return results

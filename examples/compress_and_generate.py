"""Compress Q/K/V per head (WSVD-noQ), cache K/V latents, lower attention to the fused op,
torch.compile the decode step and generate, all through the Python API.

    python examples/compress_and_generate.py [--model smollm2-135m] [--rho1 0.5]
"""

import argparse

import lowering
from wsvd_passes import Pipeline, capture_decode, capture_forward, generate, load_model
from wsvd_passes.compression.compress import calibrate, factor_plan
from wsvd_passes.compression.recipes import RECIPES
from wsvd_passes.eval.data import pydoc_text, token_windows
from wsvd_passes.passes.factorize import FactorizeQKV
from wsvd_passes.passes.latent_kv import LatentKVCache


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-llama-gqa")
    parser.add_argument("--rho1", type=float, default=0.5)
    parser.add_argument("--prompt", default="The capital of France is Paris. The capital of Germany is")
    args = parser.parse_args()

    lm = load_model(args.model)
    recipe = RECIPES["wsvd-noq"]
    calib = token_windows(lm.tokenizer, pydoc_text("calibration"), 256, max_windows=16)
    plan, report = factor_plan(calibrate(capture_forward(lm.model), calib, [recipe]), recipe, args.rho1)
    print(f"{recipe.name}: rho1 {report.rho1:.3f}, rho2 {report.rho2:.3f}")

    prompt = lm.tokenizer(args.prompt, return_tensors="pt").input_ids
    decoder = capture_decode(lm.model, max_cache_len=prompt.shape[1] + 24)
    rewrite = LatentKVCache(decoder.config)
    Pipeline([FactorizeQKV(plan), rewrite])(decoder)
    print(f"latent cache: {rewrite.bytes.latent} bytes vs {rewrite.bytes.dense} dense ({rewrite.bytes.ratio:.3f})")
    lowering.lower(decoder)
    tokens = generate(decoder, prompt, 24, step=lowering.compile_step(decoder))
    print(args.prompt + lm.tokenizer.decode(tokens[0, prompt.shape[1]:], skip_special_tokens=True))


if __name__ == "__main__":
    main()

"""Capture SmolLM2-135M, list its attention sites, collect calibration statistics and
evaluate perplexity on a few windows of the pydoc text, all through the Python API.

    python examples/eval_smollm2.py [--model tiny-llama-gqa] [--windows 8]
"""

import argparse

import torch

from wsvd_passes import capture_forward, collect_input_stats, evaluate, find_sites, load_model
from wsvd_passes.eval.data import pydoc_text, token_windows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args()

    lm = load_model(args.model)
    captured = capture_forward(lm.model)
    sites = find_sites(captured.gm)
    s = sites[0]
    print(f"{len(sites)} attention layers; {s.n_heads} query heads, {s.n_kv_heads} kv heads, head dim {s.head_dim}")

    calib = token_windows(lm.tokenizer, pydoc_text("calibration"), 256, max_windows=4)
    stats = collect_input_stats(captured, calib.split(2))
    eig = torch.linalg.eigvalsh(stats[0].qkv.gram)
    print(f"layer 0 q/k/v input: {stats[0].qkv.tokens} tokens, Gram eigenvalues in [{eig[0]:.3g}, {eig[-1]:.3g}]")

    windows = token_windows(lm.tokenizer, pydoc_text("evaluation"), 256, max_windows=args.windows)
    result = evaluate(lambda ids: captured.gm(input_ids=ids), windows)
    print(f"perplexity {result.ppl:.3f} over {result.tokens} tokens")


if __name__ == "__main__":
    main()

"""vLLM's KV-cache capacity and greedy tokens of an artifact served with the latent and the dense cache.

Run from the serving venv (README, "Serving with vLLM"); the artifact comes from ``wsvd compress``::

    venv-serve/bin/python examples/vllm_capacity.py ART OUT [--json capacity.json]

Exports ART to OUT/latent and OUT/dense, decodes 3 prompts x 16 tokens with the artifact's own decode graph,
then serves each directory with ``tests/vllm_greedy.py`` (float32 and bfloat16, eager; bfloat16 compiled with
vLLM's torch.compile) at ``VLLM_CPU_KVCACHE_SPACE=1``. Prints and writes per run: vLLM's capacity in tokens,
the cache bytes per token from the exported ranks, and the first step where vLLM's tokens leave the artifact's.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from wsvd_passes.artifacts import artifact
from wsvd_passes.eval.generation import greedy_generate
from wsvd_passes.serve.export import export_vllm
from wsvd_passes.serve.format import SCALE_BYTES, latent_cache_scales

GREEDY = Path(__file__).resolve().parent.parent / "tests" / "vllm_greedy.py"
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Water boils at a temperature of")
RUNS = (("float32", "1"), ("bfloat16", "1"), ("bfloat16", "0"))  # (model dtype, WSVD_VLLM_EAGER)


def cache_bytes(block: dict, kv_heads: int, value_bytes: int) -> int:
    """Bytes per token over all layers: the latent entries (int8 codes + float32 scales, or float values), or
    dense K and V (2 n_kv D values)."""
    if block["kv_cache"] == "dense":
        return 2 * kv_heads * block["head_dim"] * len(block["layers"]) * value_bytes
    values = sum(sum(layer[p]["ranks"]) for layer in block["layers"] for p in ("k", "v"))
    scales = sum(sum(latent_cache_scales(block, i).values()) for i in range(len(block["layers"])))
    return values + SCALE_BYTES * scales if scales else values * value_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("out")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = Path(args.out)
    blocks = {kv: export_vllm(args.artifact, out / kv, kv) for kv in ("latent", "dense")}
    config = json.loads((out / "latent" / "config.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "latent")
    prompts = [tokenizer(t).input_ids for t in PROMPTS]
    decoder = artifact.load(args.artifact, decode=True, max_cache_len=max(map(len, prompts)) + 16).captured
    expected = [greedy_generate(decoder, torch.tensor([p]), 16)[0, len(p):].tolist() for p in prompts]
    results = {"machine": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "rho2": blocks["latent"]["rho2"], "artifact_tokens": expected, "runs": []}
    for dtype, eager in RUNS:
        for kv in ("latent", "dense"):
            start = time.time()
            run = subprocess.run([sys.executable, str(GREEDY), str(out / kv), json.dumps(prompts), "16"],
                                 capture_output=True, text=True,
                                 env=os.environ | {"WSVD_VLLM_DTYPE": dtype, "WSVD_VLLM_EAGER": eager})
            if run.returncode:
                sys.exit(f"error: vLLM failed on {out / kv} ({dtype}): {run.stderr.strip().splitlines()[-1]}")
            found = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in run.stdout.splitlines()
                     if line.startswith(("TOKENS ", "KV_TOKENS "))}
            first = [next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
                     for got, want in zip(found["TOKENS"], expected)]
            row = {"cache": kv, "dtype": dtype, "compiled": eager == "0", "kv_tokens": found["KV_TOKENS"],
                   "bytes_per_token": cache_bytes(blocks[kv], config["num_key_value_heads"],
                                                  torch.finfo(getattr(torch, dtype)).bits // 8),
                   "first_differing_step": first, "wall_s": round(time.time() - start, 1)}
            results["runs"].append(row)
            print(f"{kv:6} {dtype:8} {'compiled' if row['compiled'] else 'eager':8} capacity {row['kv_tokens']:>9,} "
                  f"tokens, {row['bytes_per_token']:,} B/token, first differing step {first}, {row['wall_s']} s",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

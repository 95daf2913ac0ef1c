"""The online Hadamard before down_proj, applied as a dense [n, n] matmul (the baseline) and as the structured
transform ``hadamard_rotate`` (x (.) s, then one small matmul per Kronecker factor): multiply-adds, weight bytes
and CPU time per call for the MLP widths of common models, then one forward of a rotated SmolLM2-135M (`quarot`
W8A8) with each. Prints the figures and writes JSON.

    python examples/online_hadamard_bench.py [--model smollm2-135m] [--json online_hadamard.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from wsvd_passes import capture_forward, load_model
from wsvd_passes.algorithms.hadamard import hadamard_factors, hadamard_macs, hadamard_rotate
from wsvd_passes.algorithms.quantize import parse_bits
from wsvd_passes.compression.compress import compress
from wsvd_passes.compression.recipes import RECIPES
from wsvd_passes.graph.graph_utils import is_call

WIDTHS = {"SmolLM2-135M": 1536, "TinyLlama-1.1B": 5632, "Llama-2-7B": 11008, "Llama-3-8B": 14336}


def _ms(fn, repeats: int) -> float:
    fn()
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - begin) / repeats * 1e3


_DENSE: dict[int, torch.Tensor] = {}  # the baseline's H per size, formed once from the graph's own factors


def _dense(x: torch.Tensor, signs: torch.Tensor, k: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """The baseline: x @ H with H [n, n] formed (what the graph held before the structured transform)."""
    n = x.shape[-1]
    if n not in _DENSE:
        _DENSE[n] = hadamard_rotate(torch.eye(n, dtype=x.dtype), signs, k, m1, m2)
    return x @ _DENSE[n]


def _kl(reference_logp: torch.Tensor, logits: torch.Tensor) -> float:
    logp = logits.log_softmax(-1)
    return float((reference_logp.exp() * (reference_logp - logp)).sum(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per call (a prefill window)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(machine)
    print(f"{'model':<16}{'n':>7}{'dense MACs':>14}{'structured':>12}{'dense bf16 B':>14}{'factors B':>11}"
          f"{'dense ms':>10}{'struct ms':>11}")
    rows = []
    for name, n in WIDTHS.items():
        f = hadamard_factors(n, 0)
        factors = [t.float() for t in f.tensors()]
        H = hadamard_rotate(torch.eye(n), *factors)
        x = torch.randn(args.tokens, n)
        torch.testing.assert_close(hadamard_rotate(x, *factors), x @ H, rtol=1e-4, atol=1e-4)
        structured, dense = hadamard_macs(n)
        row = {"model": name, "n": n, "dense_macs": dense, "structured_macs": structured, "dense_bf16_bytes": 2 * n * n,
               "factor_bytes": 4 * sum(t.numel() for t in factors),
               "dense_ms": _ms(lambda: x @ H, args.repeats),
               "structured_ms": _ms(lambda: hadamard_rotate(x, *factors), args.repeats)}
        rows.append(row)
        print(f"{name:<16}{n:>7}{dense:>14,}{structured:>12,}{row['dense_bf16_bytes']:>14,}{row['factor_bytes']:>11,}"
              f"{row['dense_ms']:>10.2f}{row['structured_ms']:>11.2f}")

    lm = load_model(args.model)
    base = capture_forward(lm.model)
    rotated, _ = compress(base, None, RECIPES["quarot"], None, parse_bits("w8a8"))
    ids = torch.randint(0, lm.model.config.vocab_size, (1, args.tokens))
    gm = rotated.gm
    with torch.no_grad():
        reference = base.gm(input_ids=ids).log_softmax(-1)
        kl = {}  # KL(unrotated fp32 || rotated W8A8) per token: int8 rounding flips differ, the quality must not
        kl["structured"] = _kl(reference, gm(input_ids=ids))
        structured_ms = _ms(lambda: gm(input_ids=ids), args.repeats)
        nodes = [node for node in gm.graph.nodes if is_call(node, hadamard_rotate)]
        for node in nodes:
            node.target = _dense
        gm.recompile()
        kl["dense"] = _kl(reference, gm(input_ids=ids))
        dense_ms = _ms(lambda: gm(input_ids=ids), args.repeats)
    forward = {"model": args.model, "recipe": "quarot w8a8", "tokens": args.tokens, "online_hadamards": len(nodes),
               "dense_ms": dense_ms, "structured_ms": structured_ms, "kl_dense": kl["dense"],
               "kl_structured": kl["structured"]}
    print(f"{args.model} quarot W8A8 forward of {args.tokens} tokens ({len(nodes)} online Hadamards): "
          f"dense {dense_ms:.0f} ms (KL to fp {kl['dense']:.4f}), structured {structured_ms:.0f} ms "
          f"(KL {kl['structured']:.4f}): {dense_ms / structured_ms:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine, "transform": rows, "forward": forward}, fh, indent=2)


if __name__ == "__main__":
    main()

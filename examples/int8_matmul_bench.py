"""Which int8 matmul the CPU int8 runtime should use: float32 ``linear`` (the baseline), ``torch._int_mm``
(int8 x int8 -> int32, what ``lowering.int8.int8_linear`` runs), ``int8_linear`` itself (activation quantiser
included) and ``torch._weight_int8pack_mm`` (weight-only int8), on SmolLM2-135M's linear shapes, at 1 and 8
tokens. Prints microseconds per call and writes JSON.

    python examples/int8_matmul_bench.py [--json int8_matmul.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from lowering.int8 import int8_linear

SHAPES = {"mlp up/gate [1536, 576]": (1536, 576), "mlp down [576, 1536]": (576, 1536), "lm head [49152, 576]": (49152, 576)}


def _us(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - begin) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{'shape':<24}{'tokens':>7}{'fp32 us':>10}{'_int_mm':>10}{'int8_linear':>13}{'weight-only':>13}")
    for name, (n, k) in SHAPES.items():
        for m in (1, 8):
            x, w = torch.randn(m, k), torch.randn(n, k)
            codes, scale = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n)
            xq = torch.randint(-127, 128, (m, k), dtype=torch.int8)
            row = {"shape": name, "tokens": m,
                   "fp32_us": _us(lambda: torch.nn.functional.linear(x, w), args.repeats),
                   "int_mm_us": _us(lambda: torch._int_mm(xq, codes.t()), args.repeats),
                   "int8_linear_us": _us(lambda: int8_linear(x, codes, scale, None), args.repeats),
                   "weight_only_us": _us(lambda: torch._weight_int8pack_mm(x, codes, scale), max(3, args.repeats // 10))}
            rows.append(row)
            print(f"{name:<24}{m:>7}{row['fp32_us']:>10.0f}{row['int_mm_us']:>10.0f}{row['int8_linear_us']:>13.0f}"
                  f"{row['weight_only_us']:>13.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                       "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

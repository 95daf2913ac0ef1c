"""Roofline model of one decode step's attention: bytes and FLOPs, and the time they bound on H100/H200.

Per decode step, B sequences of L cached tokens, n_q query heads over n_kv kv heads of dim D (G = n_q/n_kv):

dense flash decoding (SDPA over a bf16 K/V cache)
    bytes = B n_kv L 2 D 2  (+ q, out)             tensor FLOPs = B n_q L 4 D (scores and P V)

latent kernel (:mod:`wsvd_kernels.latent_attention`), latents of rank r_k, r_v, e bytes per value
(bf16 2, int8 1 + a float32 scale per token and head and latent):
    bytes = B h_c L (r_k + r_v) e (+ int8: 2 * 4 B h_c L)  + bk + q + out  (+ paged: 4 B ceil(L / P), block tables)
    h_c = n_kv per-head latents; 1 for a latent shared by every kv head (read from HBM once per
    sequence, then from L2 by each kv head's program); a joint (QSVD) latent serves K and V: r_v = r_k,
    stored once. At equal cache bytes a joint latent has rank 2 n_kv r, so rebuilding every head's
    K from it costs n_kv times the FLOPs of per-head factors: that row is compute-bound.
    tensor FLOPs = B n_kv L (2 r_k D                  K_lo = C B_lo, K_hi = C B_hi
                             + 2 M D + 2 M r_v)        scores and P C_V with M = G padded to 16 (G > 1)
    CUDA-core FLOPs = B n_kv L (8 D                    angle-added cos/sin and the rotation, per token
                               + [G = 1] (2 D + 2 r_v)) the GEMV score and value accumulation

The predicted time is the roofline bound max(bytes / HBM bandwidth, tensor FLOPs / bf16 dense peak,
CUDA-core FLOPs / fp32 peak): a lower bound that assumes full overlap and peak rates, to compare
designs, not a measurement.
"""

from __future__ import annotations

import dataclasses

# Peak figures from NVIDIA's data sheets (SXM, dense, no sparsity).
GPUS = {
    "H100 SXM": dict(hbm_bytes_s=3.35e12, tensor_flops=989e12, fp32_flops=67e12),
    "H200 SXM": dict(hbm_bytes_s=4.8e12, tensor_flops=989e12, fp32_flops=67e12),
}
BF16, INT8_SCALE = 2, 4  # bytes of a bf16 value, of an int8 latent's float32 scale


@dataclasses.dataclass(frozen=True)
class Step:
    """One decode step's attention work."""

    bytes: float
    tensor_flops: float
    cuda_flops: float

    def seconds(self, gpu: str) -> float:
        peak = GPUS[gpu]
        return max(self.bytes / peak["hbm_bytes_s"], self.tensor_flops / peak["tensor_flops"],
                   self.cuda_flops / peak["fp32_flops"])

    def bound(self, gpu: str) -> str:
        """Which roof binds: memory, tensor or cuda-core."""
        peak = GPUS[gpu]
        times = {"memory": self.bytes / peak["hbm_bytes_s"], "tensor": self.tensor_flops / peak["tensor_flops"],
                 "cuda-core": self.cuda_flops / peak["fp32_flops"]}
        return max(times, key=times.get)


def dense_step(batch: int, n_q: int, n_kv: int, head_dim: int, seq_len: int) -> Step:
    """Flash decoding over a dense bf16 K/V cache."""
    cache = batch * n_kv * seq_len * 2 * head_dim * BF16
    io = 2 * batch * n_q * head_dim * BF16
    return Step(cache + io, batch * n_q * seq_len * 4 * head_dim, 0.0)


def latent_step(batch: int, n_q: int, n_kv: int, head_dim: int, seq_len: int, rank_k: float, rank_v: float,
                latent: str = "bf16", joint: bool = False, page_size: int | None = None) -> Step:
    """The fused latent kernel (``latent`` "bf16" or "int8"; ``joint``: one latent of rank ``rank_k`` for
    K and V of every kv head, ``rank_v`` ignored; ranks may be per-head means of unequal ranks). ``page_size``: the
    paged variant, which also reads each sequence's block table, 4 bytes per page (from HBM once, then L2)."""
    group = n_q // n_kv
    rank_v = rank_k if joint else rank_v
    tokens = batch * (1 if joint else n_kv) * seq_len
    per_value = 1 if latent == "int8" else BF16
    stored = (1 if joint else 2) * tokens
    cache = (rank_k if joint else rank_k + rank_v) * tokens * per_value + (stored * INT8_SCALE if latent == "int8" else 0)
    io = n_kv * rank_k * head_dim * BF16 + batch * n_q * head_dim * BF16 + batch * n_q * rank_v * 4
    if page_size:
        cache += batch * -(-seq_len // page_size) * 4
    rows = 0 if group == 1 else max(16, group)
    work = batch * n_kv * seq_len
    tensor = work * (2 * rank_k * head_dim + 2 * rows * head_dim + 2 * rows * rank_v)
    cuda = work * (8 * head_dim + (2 * head_dim + 2 * rank_v if group == 1 else 0))
    return Step(cache + io, tensor, cuda)


def roofline_table(shapes: list[dict]) -> list[dict]:
    """One row per shape (batch, heads, head_dim, seq_len, rank_ratio; optional kv_heads) and latent
    kind (per-head bf16 and int8 of rank ratio * D, joint bf16 of the same cache bytes): bytes, FLOPs,
    predicted microseconds per GPU for dense and latent, and the predicted speedup."""
    rows = []
    for shape in shapes:
        b, n_q, d, length = (shape[k] for k in ("batch", "heads", "head_dim", "seq_len"))
        n_kv = shape.get("kv_heads", n_q)
        rank = max(1, round(shape["rank_ratio"] * d))
        dense = dense_step(b, n_q, n_kv, d, length)
        for latent, joint in (("bf16", False), ("int8", False), ("bf16", True)):
            r = 2 * n_kv * rank if joint else rank
            step = latent_step(b, n_q, n_kv, d, length, r, r, latent, joint)
            row = {**shape, "kv_heads": n_kv, "rank": r, "latent": latent + ("-joint" if joint else ""),
                   "dense_bytes": dense.bytes, "latent_bytes": step.bytes, "latent_tensor_flops": step.tensor_flops,
                   "latent_cuda_flops": step.cuda_flops}
            for gpu in GPUS:
                key = gpu.split()[0].lower()
                row[f"{key}_dense_us"] = dense.seconds(gpu) * 1e6
                row[f"{key}_latent_us"] = step.seconds(gpu) * 1e6
                row[f"{key}_bound"] = step.bound(gpu)
                row[f"{key}_speedup"] = dense.seconds(gpu) / step.seconds(gpu)
            rows.append(row)
    return rows


def print_roofline(rows: list[dict]) -> None:
    print("roofline (lower bounds at peak rates; not measurements): dense bf16 flash decoding vs the latent kernel")
    print(f"{'B':>4}{'heads':>6}{'kv':>4}{'D':>5}{'L':>7}{'r':>5} {'latent':<12}{'dense MB':>10}{'latent MB':>10}"
          f"{'H100 dense us':>14}{'H100 lat us':>12}{'x H100':>8}{'x H200':>8}  bound")
    for r in rows:
        print(f"{r['batch']:>4}{r['heads']:>6}{r['kv_heads']:>4}{r['head_dim']:>5}{r['seq_len']:>7}{r['rank']:>5} "
              f"{r['latent']:<12}{r['dense_bytes'] / 1e6:>10.1f}{r['latent_bytes'] / 1e6:>10.1f}"
              f"{r['h100_dense_us']:>14.1f}{r['h100_latent_us']:>12.1f}{r['h100_speedup']:>8.2f}"
              f"{r['h200_speedup']:>8.2f}  {r['h100_bound']}")

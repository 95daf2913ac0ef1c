"""Triton kernels and their PyTorch / float64 references.

Planned here (issue 5): the fused latent-KV flash-decoding kernel that rebuilds K
from its low-rank latent on-chip, applies RoPE and runs split-K online softmax.
Kernels are tested on the CPU with ``TRITON_INTERPRET=1``.
"""

"""Triton kernels and their PyTorch / float64 references.

``latent_attention``: the fused latent-KV flash-decoding kernel (rebuilds K from its
pre-RoPE low-rank latent on-chip, applies RoPE, split-K online softmax in latent space).
``reference``: the float64 reference and the vectorised PyTorch version of the same op.
Kernels are tested on the CPU with ``TRITON_INTERPRET=1``.
"""

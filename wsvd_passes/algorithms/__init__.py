"""Numerical building blocks, free of graphs: SVD groups and whitening, rank allocation, Fisher fine-tuning,
quantisers and clip search, Hadamard matrices, RoPE tables."""

"""Lowering of compressed decode graphs to our ``torch.library`` op and ``torch.compile``.

- :mod:`lowering.ops`: the ``wsvd::latent_attention`` custom op (CPU: PyTorch, CUDA: Triton);
- :mod:`lowering.match`: the pass that replaces attention over the latent cache by the op;
- :mod:`lowering.compile`: :func:`lower` and :func:`compile_step`.
"""

from .compile import compile_step, lower

__all__ = ["compile_step", "lower"]

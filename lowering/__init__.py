"""Lowering of compressed decode graphs to our ``torch.library`` op and ``torch.compile``.

- :mod:`lowering.ops`: the ``wsvd::latent_attention`` custom op (CPU: PyTorch, CUDA: Triton);
- :mod:`lowering.match`: the pass that replaces attention over the latent cache by the op;
- :mod:`lowering.int8`: the pass that runs W8A8 linears (``torch._int_mm``) and 8-bit tables in integers
  (:func:`lower_int8`);
- :mod:`lowering.compile`: :func:`lower` and :func:`compile_step`.
"""

from .compile import compile_step, lower
from .int8 import lower_int8

__all__ = ["compile_step", "lower", "lower_int8"]

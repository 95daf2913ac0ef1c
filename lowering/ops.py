"""The ``wsvd::latent_attention`` custom op (``torch.library``).

    latent_attention(q [B, n_q, D], ck [B, n_kv, L, r_k], bk [n_kv, r_k, D], cv [B, n_kv, L, r_v],
                     lengths int64 [B], inv_freq [D/2], scale, attention_scaling) -> [B, n_q, r_v] float32

Attention of one new query token per sequence over a latent KV cache: K is rebuilt
per cached token as ``RoPE_j(ck[j] @ bk)`` at its position j, V stays in latent
space (its up-projection lives in the folded o_proj). CPU: the vectorised PyTorch
implementation; CUDA: the fused Triton flash-decoding kernel. The fake
implementation makes the op traceable by ``torch.export`` and ``torch.compile``,
where it stays one opaque node. Import this module before loading a saved program
that contains the op.
"""

from __future__ import annotations

import torch

from kernels.latent_attention import latent_decode_attention_triton
from kernels.reference import latent_decode_attention_torch


@torch.library.custom_op("wsvd::latent_attention", mutates_args=())
def latent_attention(
    q: torch.Tensor, ck: torch.Tensor, bk: torch.Tensor, cv: torch.Tensor, lengths: torch.Tensor,
    inv_freq: torch.Tensor, scale: float, attention_scaling: float,
) -> torch.Tensor:
    return latent_decode_attention_torch(q, ck, bk, cv, lengths, inv_freq, scale=scale,
                                         attention_scaling=attention_scaling)


@latent_attention.register_kernel("cuda")
def _latent_attention_cuda(q, ck, bk, cv, lengths, inv_freq, scale, attention_scaling):
    return latent_decode_attention_triton(q, ck, bk, cv, lengths, inv_freq, scale=scale,
                                          attention_scaling=attention_scaling)


@latent_attention.register_fake
def _latent_attention_fake(q, ck, bk, cv, lengths, inv_freq, scale, attention_scaling):
    return q.new_empty((q.shape[0], q.shape[1], cv.shape[-1]), dtype=torch.float32)

"""Our ``torch.library`` custom ops: ``wsvd::latent_attention`` and ``wsvd::paged_latent_attention``.

    latent_attention(q [B, n_q, D], ck [B, n_kv, L, r_k], bk [n_kv, r_k, D], cv [B, n_kv, L, r_v],
                     lengths int64 [B], cos [L_rope, D/2], sin [L_rope, D/2], scale, attention_scaling,
                     ck_scale [B, n_kv, L]?, cv_scale [B, n_kv, L]?) -> [B, n_q, r_v] float32

    paged_latent_attention(q [B, n_q, D], cache [blocks, P, C], block_table [B, blocks], lengths [B],
                           bk [n_kv, w_k, D], heads int32 [6, n_kv], cos, sin, scale, attention_scaling,
                           max_len, width_v) -> [B, n_q, width_v] float32

Attention of one new query token per sequence over a latent KV cache: K is rebuilt per cached token
as ``RoPE_j(ck[j] @ bk)`` at its position j (cos/sin: the model's float32 tables of ``j * inv_freq``),
V stays in latent space (its up-projection lives in the folded o_proj). int8 latents come with their
per-token, per-head float32 scales. A latent shared by every kv head is passed as an expanded view
(head stride 0) and never copied. The paged op reads the same latents from vLLM-style pages of packed
entries (:func:`wsvd_kernels.reference.gather_pages`: head h's channels at its column of ``heads``, int8
scales as bytes); on CUDA the kernel reads the pages in place, on the CPU they are gathered first.
CPU: the vectorised PyTorch implementation; CUDA: the fused Triton flash-decoding kernel, except where
it cannot run (ranks above ``MAX_RANK``, or a kernel that fails to compile or launch): then the PyTorch
implementation, with a one-line warning, never a wrong answer.
The fake implementation makes the op traceable by ``torch.export`` and ``torch.compile``. Under
``torch.compile`` it stays one opaque node on CUDA (the Triton kernel); on the CPU
:func:`lowering.compile.compile_step` compiles it as :func:`latent_attention_traceable` (the same
PyTorch math as a plain function), so the K rebuild, RoPE, masking and softmax fuse instead of running
as a chain of eager kernels over [B, n_kv, L, D] temporaries. Import this module before loading a
saved program that contains the op.
"""

from __future__ import annotations

import warnings

import torch

from wsvd_kernels.latent_attention import (
    MAX_RANK,
    latent_decode_attention_triton,
    paged_latent_decode_attention_triton,
)
from wsvd_kernels.reference import latent_decode_attention_torch, paged_latent_decode_attention_torch

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@torch.library.custom_op("wsvd::latent_attention", mutates_args=())
def latent_attention(
    q: torch.Tensor, ck: torch.Tensor, bk: torch.Tensor, cv: torch.Tensor, lengths: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, scale: float, attention_scaling: float,
    ck_scale: torch.Tensor | None = None, cv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    return latent_attention_traceable(q, ck, bk, cv, lengths, cos, sin, scale, attention_scaling, ck_scale, cv_scale)


def latent_attention_traceable(q, ck, bk, cv, lengths, cos, sin, scale, attention_scaling, ck_scale=None,
                               cv_scale=None) -> torch.Tensor:
    """The op's CPU implementation as a plain function (same arguments), which ``torch.compile`` traces into."""
    return latent_decode_attention_torch(q, ck, bk, cv, lengths, cos, sin, scale=scale,
                                         attention_scaling=attention_scaling, ck_scale=ck_scale, cv_scale=cv_scale)


def _triton_or_torch(op: str, rank: int, triton_impl, torch_impl, *args, **kwargs):
    """The Triton kernel, or the PyTorch implementation (one warning) where it cannot run: ranks above
    MAX_RANK, or a kernel that fails to compile or launch. Bad arguments raise their one-line ValueError."""
    if rank > MAX_RANK:
        _warn_once(f"{op}: latent rank {rank} > {MAX_RANK}, above what the Triton kernel holds "
                   "on-chip; running the PyTorch implementation")
        return torch_impl(*args, **kwargs)
    try:
        return triton_impl(*args, **kwargs)
    except ValueError:  # bad arguments: the same one-line error the PyTorch path gives
        raise
    except Exception as e:  # noqa: BLE001 - a kernel that cannot compile or launch here
        _warn_once(f"{op}: the Triton kernel failed ({type(e).__name__}: "
                   f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); running the PyTorch implementation")
        return torch_impl(*args, **kwargs)


@latent_attention.register_kernel("cuda")
def _latent_attention_cuda(q, ck, bk, cv, lengths, cos, sin, scale, attention_scaling, ck_scale=None, cv_scale=None):
    return _triton_or_torch("wsvd::latent_attention", max(ck.shape[-1], cv.shape[-1]), latent_decode_attention_triton,
                            latent_decode_attention_torch, q, ck, bk, cv, lengths, cos, sin, scale=scale,
                            attention_scaling=attention_scaling, ck_scale=ck_scale, cv_scale=cv_scale)


@latent_attention.register_fake
def _latent_attention_fake(q, ck, bk, cv, lengths, cos, sin, scale, attention_scaling, ck_scale=None, cv_scale=None):
    return q.new_empty((q.shape[0], q.shape[1], cv.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("wsvd::paged_latent_attention", mutates_args=())
def paged_latent_attention(
    q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor, bk: torch.Tensor,
    heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float, attention_scaling: float, max_len: int,
    width_v: int,
) -> torch.Tensor:
    return paged_latent_decode_attention_torch(q, cache, block_table, lengths, bk, heads, cos, sin, max_len=max_len,
                                               width_v=width_v, scale=scale, attention_scaling=attention_scaling)


@paged_latent_attention.register_kernel("cuda")
def _paged_latent_attention_cuda(q, cache, block_table, lengths, bk, heads, cos, sin, scale, attention_scaling,
                                 max_len, width_v):
    return _triton_or_torch("wsvd::paged_latent_attention", max(bk.shape[1], width_v),
                            paged_latent_decode_attention_triton, paged_latent_decode_attention_torch, q, cache,
                            block_table, lengths, bk, heads, cos, sin, max_len=max_len, width_v=width_v, scale=scale,
                            attention_scaling=attention_scaling)


@paged_latent_attention.register_fake
def _paged_latent_attention_fake(q, cache, block_table, lengths, bk, heads, cos, sin, scale, attention_scaling,
                                 max_len, width_v):
    return q.new_empty((q.shape[0], q.shape[1], width_v), dtype=torch.float32)

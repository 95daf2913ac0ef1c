"""Decode attention over a pre-RoPE latent K/V cache: float64 reference and PyTorch version.

For sequence b, query head i (kv head h = i // G, G = n_q / n_kv) and cached token j < lengths[b]:

    K[j]     = RoPE_j(C_K[b, h, j] @ bk[h])                 C_K [r_k], bk[h] [r_k, D], K[j] [D]
    s[j]     = scale * q[b, i] . K[j]
    out[b,i] = sum_j softmax(s)[j] * C_V[b, h, j]            C_V [r_v], out [B, n_q, r_v]

RoPE is Hugging Face's rotate_half convention at position j with ``a = attention_scaling``:
``RoPE_j(k) = a * (k * cat(cos[j], cos[j]) + rotate_half(k) * cat(sin[j], sin[j]))`` where the tables
cos, sin [L_rope >= L_max, D/2] hold ``cos(j * inv_freq)``, ``sin(j * inv_freq)`` of the angle rounded
to float32 as the model computes it (:func:`wsvd_passes.algorithms.rope.rope_half_tables`). int8 latents are
dequantised per (token, head): ``C = int8 * scale[b, h, j]``. Cache rows ``j >= lengths[b]`` may
hold anything, infinities included, and never reach the result (a sequence of length 0 gives zeros).
Both functions share the signature of :func:`wsvd_kernels.latent_attention.latent_decode_attention_triton`;
``num_splits`` only matters there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LatentDims(NamedTuple):
    batch: int
    n_q: int
    n_kv: int
    max_len: int
    r_k: int
    r_v: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.n_q // self.n_kv


def _check_latent(name, c, c_scale, batch_heads_len, device):
    if c.dim() != 4 or tuple(c.shape[:3]) != batch_heads_len:
        raise ValueError(f"{name} must be [B, n_kv, L_max, r] = [{', '.join(map(str, batch_heads_len))}, r], "
                         f"got {list(c.shape)}")
    if c.dtype == torch.int8:
        if c_scale is None:
            raise ValueError(f"{name} is int8 but {name}_scale is missing (float32 [B, n_kv, L_max])")
        if tuple(c_scale.shape) != batch_heads_len or not c_scale.is_floating_point():
            raise ValueError(f"{name}_scale must be floating point {list(batch_heads_len)}, "
                             f"got {c_scale.dtype} {list(c_scale.shape)}")
    elif not c.is_floating_point():
        raise ValueError(f"{name} must be floating point or int8, got {c.dtype}")
    elif c_scale is not None:
        raise ValueError(f"{name}_scale is given but {name} is {c.dtype}, not int8")
    for t in (c, c_scale):
        if t is not None and t.device != device:
            raise ValueError(f"{name} tensors are on {t.device}, q is on {device}")


def check_latent_args(q, ck, bk, cv, lengths, cos, sin, ck_scale=None, cv_scale=None, num_splits=None) -> LatentDims:
    """Validate the shared arguments; raise a one-line ValueError naming the problem."""
    if q.dim() != 3 or not q.is_floating_point():
        raise ValueError(f"q must be floating point [B, n_q, D], got {q.dtype} {list(q.shape)}")
    batch, n_q, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"head dim D must be even for RoPE, got {head_dim}")
    if ck.dim() != 4 or ck.shape[0] != batch:
        raise ValueError(f"ck must be [B={batch}, n_kv, L_max, r_k], got {list(ck.shape)}")
    _, n_kv, max_len, r_k = ck.shape
    if n_kv == 0 or n_q % n_kv:
        raise ValueError(f"n_q={n_q} query heads is not a multiple of n_kv={n_kv} kv heads")
    _check_latent("ck", ck, ck_scale, (batch, n_kv, max_len), q.device)
    _check_latent("cv", cv, cv_scale, (batch, n_kv, max_len), q.device)
    if tuple(bk.shape) != (n_kv, r_k, head_dim) or not bk.is_floating_point():
        raise ValueError(f"bk must be floating point [n_kv, r_k, D] = [{n_kv}, {r_k}, {head_dim}], "
                         f"got {bk.dtype} {list(bk.shape)}")
    if tuple(lengths.shape) != (batch,) or lengths.is_floating_point() or lengths.is_complex():
        raise ValueError(f"lengths must be an integer tensor [B={batch}], got {lengths.dtype} {list(lengths.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[0] < max_len or t.shape[1] != head_dim // 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating point table [L_rope >= L_max={max_len}, D/2={head_dim // 2}], "
                             f"got {t.dtype} {list(t.shape)}")
    for name, t in (("bk", bk), ("lengths", lengths), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q is on {q.device}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    return LatentDims(batch, n_q, n_kv, max_len, r_k, cv.shape[-1], head_dim)


def _dequantise(c: torch.Tensor, c_scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    c = c.to(dtype)
    return c if c_scale is None else c * c_scale.to(dtype)[..., None]


def _full(table: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[length, D] = cat(table[:length], table[:length]) in dtype."""
    return torch.cat([table[:length], table[:length]], dim=-1).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def latent_decode_attention_reference(q, ck, bk, cv, lengths, cos, sin, *, scale, attention_scaling=1.0,
                                      ck_scale=None, cv_scale=None, num_splits=None) -> torch.Tensor:
    """Dense float64 reference, one (sequence, kv head) at a time: float64 [B, n_q, r_v]."""
    dims = check_latent_args(q, ck, bk, cv, lengths, cos, sin, ck_scale, cv_scale, num_splits)
    f64 = torch.float64
    c_k, c_v = _dequantise(ck, ck_scale, f64), _dequantise(cv, cv_scale, f64)
    cos, sin = (_full(t, dims.max_len, f64) * attention_scaling for t in (cos, sin))
    out = torch.zeros(dims.batch, dims.n_q, dims.r_v, dtype=f64, device=q.device)
    for b in range(dims.batch):
        n = max(0, min(int(lengths[b]), dims.max_len))
        for h in range(dims.n_kv):
            k = c_k[b, h, :n] @ bk[h].to(f64)  # [n, D]
            k = k * cos[:n] + rotate_half(k) * sin[:n]
            heads = slice(h * dims.group, (h + 1) * dims.group)
            p = torch.softmax(scale * q[b, heads].to(f64) @ k.T, dim=-1)  # [G, n]
            out[b, heads] = p @ c_v[b, h, :n]
    return out


def latent_decode_attention_torch(q, ck, bk, cv, lengths, cos, sin, *, scale, attention_scaling=1.0,
                                  ck_scale=None, cv_scale=None, num_splits=None) -> torch.Tensor:
    """Vectorised PyTorch version, float32 compute over the whole cache with a length mask: [B, n_q, r_v]."""
    dims = check_latent_args(q, ck, bk, cv, lengths, cos, sin, ck_scale, cv_scale, num_splits)
    f32 = torch.float32
    valid = torch.arange(dims.max_len, device=q.device) < lengths[:, None]  # [B, L]
    c_v = _dequantise(cv, cv_scale, f32).masked_fill(~valid[:, None, :, None], 0.0)  # garbage never reaches the sum
    k = _dequantise(ck, ck_scale, f32) @ bk.to(f32)  # [B, n_kv, L, D]
    k = k * _full(cos, dims.max_len, f32) + rotate_half(k) * _full(sin, dims.max_len, f32)
    q = q.to(f32).reshape(dims.batch, dims.n_kv, dims.group, dims.head_dim)
    s = (q @ k.transpose(-1, -2)) * (scale * attention_scaling)  # [B, n_kv, G, L]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - m.masked_fill(m == float("-inf"), 0.0))  # exp(-inf) = 0 on masked tokens
    l = p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(f32).tiny)  # l = 0 only for length 0, where p @ c_v = 0
    return ((p @ c_v) / l).reshape(dims.batch, dims.n_q, dims.r_v)

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
``num_splits`` only matters there. :func:`paged_latent_decode_attention_torch` is the same math over latents
kept in vLLM-style pages (the Triton kernel's ``PAGED`` variant reads them in place; this version gathers).
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


def check_paged_args(q, cache, block_table, lengths, bk, heads, cos, sin, max_len, width_v,
                     num_splits=None) -> LatentDims:
    """Validate a paged call's arguments (:func:`paged_latent_decode_attention_torch`); one-line ValueError."""
    if q.dim() != 3 or not q.is_floating_point():
        raise ValueError(f"q must be floating point [B, n_q, D], got {q.dtype} {list(q.shape)}")
    batch, n_q, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"head dim D must be even for RoPE, got {head_dim}")
    if cache.dim() != 3 or not (cache.is_floating_point() or cache.dtype == torch.int8):
        raise ValueError(f"cache must be float or int8 pages [blocks, page size, entry], got {cache.dtype} "
                         f"{list(cache.shape)}")
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.is_floating_point():
        raise ValueError(f"block_table must be an integer tensor [B={batch}, blocks], got {block_table.dtype} "
                         f"{list(block_table.shape)}")
    if max_len < 0 or block_table.shape[1] * cache.shape[1] < max_len:
        raise ValueError(f"max_len={max_len} must be >= 0 and within the block table's {block_table.shape[1]} pages "
                         f"of {cache.shape[1]} tokens")
    if bk.dim() != 3 or bk.shape[2] != head_dim or not bk.is_floating_point() or bk.shape[0] == 0 or n_q % bk.shape[0]:
        raise ValueError(f"bk must be floating point [n_kv, w_k, D={head_dim}] with n_kv dividing n_q={n_q}, "
                         f"got {bk.dtype} {list(bk.shape)}")
    n_kv = bk.shape[0]
    if tuple(heads.shape) != (6, n_kv) or heads.is_floating_point():
        raise ValueError(f"heads must be an integer tensor [6, n_kv={n_kv}] (k column, k rank, v column, v rank, "
                         f"k scale byte, v scale byte), got {heads.dtype} {list(heads.shape)}")
    if tuple(lengths.shape) != (batch,) or lengths.is_floating_point() or lengths.is_complex():
        raise ValueError(f"lengths must be an integer tensor [B={batch}], got {lengths.dtype} {list(lengths.shape)}")
    if width_v < 1:
        raise ValueError(f"width_v must be >= 1, got {width_v}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[0] < max_len or t.shape[1] != head_dim // 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating point table [L_rope >= max_len={max_len}, "
                             f"D/2={head_dim // 2}], got {t.dtype} {list(t.shape)}")
    for name, t in (("cache", cache), ("block_table", block_table), ("lengths", lengths), ("bk", bk),
                    ("heads", heads), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q is on {q.device}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    return LatentDims(batch, n_q, n_kv, max_len, bk.shape[1], width_v, head_dim)


def gather_pages(cache, block_table, heads, max_len: int, width_k: int, width_v: int):
    """Pages -> the strided latents of :func:`latent_decode_attention_torch`: (ck [B, n_kv, L, w_k], ck_scale
    [B, n_kv, L] or None, cv [B, n_kv, L, w_v], cv_scale), L = max_len, a copy.

    Token j of sequence b is the entry e = cache[block_table[b, j // P], j % P] (cache [blocks, P, C]); kv head h
    reads ck[b, h, j, i] = e[heads[0, h] + i] for i < heads[1, h] (its rank r_k,h), 0 for r_k,h <= i < w_k, and cv
    likewise from heads[2, h], heads[3, h]; int8 entries hold each head's scale as the 4 bytes (float32) at
    e[heads[4, h]] (k) and e[heads[5, h]] (v)."""
    pages, columns = cache.shape[1:]
    entries = cache[block_table[:, :-(-max_len // pages)].long()].flatten(1, 2)[:, :max_len]  # [B, L, C]
    heads = heads.long()

    def latent(col, rank, width):  # [B, n_kv, L, width]
        i = torch.arange(width, device=cache.device)
        c = entries[:, :, (col[:, None] + i).clamp(max=columns - 1)]  # [B, L, n_kv, width]
        return c.masked_fill(i >= rank[:, None], 0).transpose(1, 2)

    def scales(col):  # [B, n_kv, L]
        raw = entries[:, :, col[:, None] + torch.arange(4, device=cache.device)].contiguous()
        return raw.view(torch.float32)[..., 0].transpose(1, 2)

    int8 = cache.dtype == torch.int8
    return (latent(heads[0], heads[1], width_k), scales(heads[4]) if int8 else None,
            latent(heads[2], heads[3], width_v), scales(heads[5]) if int8 else None)


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


def paged_latent_decode_attention_torch(q, cache, block_table, lengths, bk, heads, cos, sin, *, max_len, width_v,
                                        scale, attention_scaling=1.0, num_splits=None) -> torch.Tensor:
    """Decode attention over latents in pages: :func:`latent_decode_attention_torch` of :func:`gather_pages`,
    float32 [B, n_q, width_v] (columns >= r_v,h of head h's query heads are 0). q [B, n_q, D], cache [blocks, P, C]
    float or int8, block_table [B, >= ceil(max_len / P)], lengths [B] <= max_len, bk [n_kv, w_k, D] (rows >= r_k,h
    of head h zero), heads [6, n_kv] (:func:`gather_pages`)."""
    dims = check_paged_args(q, cache, block_table, lengths, bk, heads, cos, sin, max_len, width_v, num_splits)
    ck, ck_scale, cv, cv_scale = gather_pages(cache, block_table, heads, max_len, dims.r_k, width_v)
    return latent_decode_attention_torch(q, ck, bk, cv, lengths, cos, sin, scale=scale,
                                         attention_scaling=attention_scaling, ck_scale=ck_scale, cv_scale=cv_scale)

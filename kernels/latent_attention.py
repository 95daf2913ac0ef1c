"""Fused latent-KV flash-decoding: K is rebuilt from its pre-RoPE latent on-chip, V stays latent.

The math and argument conventions are those of :mod:`kernels.reference`. Shapes: q [B, n_q, D],
ck [B, n_kv, L_max, r_k] (int8: + ck_scale [B, n_kv, L_max]), bk [n_kv, r_k, D],
cv [B, n_kv, L_max, r_v] (int8: + cv_scale), lengths [B], inv_freq [D/2]; out float32 [B, n_q, r_v].

Stage 1, grid (B, n_kv, S): program (b, h, s) takes the s-th of S slices of sequence b's valid
tokens (each ceil(lengths[b] / S) rounded up to BLOCK_N, so trailing slices may be empty). With
bk[h] and its column-rotated copy bk_rh (``C_K @ bk_rh = rotate_half(C_K @ bk)``) loaded once,
for each tile of BLOCK_N tokens j (all fp32, latents dequantised before the dots):

    K_rot = (C_K @ bk) * cos(j f) + (C_K @ bk_rh) * sin(j f)      [BLOCK_N, D], f = cat(inv_freq, inv_freq)
    s     = (a * scale * log2 e) * Q_h @ K_rot^T                    [G, BLOCK_N], Q_h the G query heads of h
    online base-2 softmax:  m' = max(m, max_j s),  l = 2^(m-m') l + sum_j 2^(s-m'),
                            o = 2^(m-m') o + 2^(s-m') @ C_V         [G, r_v]

and writes the unnormalised partial (o, m, l) per (query head, slice). Stage 2, grid (B n_q,),
merges the slices: out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s with M = max_s m_s.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import check_latent_args

BLOCK_N = 32  # tokens per tile
_INTERPRETED = triton.knobs.runtime.interpret  # read when the kernels below are decorated


@triton.jit
def _load_latent_tile(c_ptr, scale_ptr, tok, tok_mask, R: tl.constexpr, BLOCK_R: tl.constexpr,
                      HAS_SCALE: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_R] latent rows ``tok`` of one (sequence, kv head), zero where masked."""
    offs_r = tl.arange(0, BLOCK_R)
    mask = tok_mask[:, None] & (offs_r < R)[None, :]
    c = tl.load(c_ptr + tok[:, None] * R + offs_r[None, :], mask=mask, other=0).to(tl.float32)
    if HAS_SCALE:
        c = c * tl.load(scale_ptr + tok, mask=tok_mask, other=0.0)[:, None]
    return c


@triton.jit
def _latent_split_kernel(
    q_ptr, ck_ptr, ck_scale_ptr, bk_ptr, cv_ptr, cv_scale_ptr, lengths_ptr, inv_freq_ptr,
    o_ptr, m_ptr, l_ptr,
    qk_scale, max_len, n_kv, num_splits,
    G: tl.constexpr, D: tl.constexpr, R_K: tl.constexpr, R_V: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_RK: tl.constexpr, BLOCK_RV: tl.constexpr,
    BLOCK: tl.constexpr, HAS_CK_SCALE: tl.constexpr, HAS_CV_SCALE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # int64: cache offsets may pass 2**31
    h = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.minimum(tl.load(lengths_ptr + b), max_len)
    split_len = tl.cdiv(tl.cdiv(length, num_splits), BLOCK) * BLOCK
    start = split * split_len
    end = tl.minimum(start + split_len, length)

    HALF: tl.constexpr = D // 2
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_rk = tl.arange(0, BLOCK_RK)
    offs_n = tl.arange(0, BLOCK)
    g_mask = offs_g < G
    d_mask = offs_d < D
    first_half = offs_d < HALF

    bk_rows = bk_ptr + h * (R_K * D) + offs_rk[:, None] * D
    bk_mask = (offs_rk < R_K)[:, None] & d_mask[None, :]
    bk = tl.load(bk_rows + offs_d[None, :], mask=bk_mask, other=0.0).to(tl.float32)
    rotated_cols = tl.where(first_half, offs_d + HALF, offs_d - HALF)
    bk_rh = tl.load(bk_rows + rotated_cols[None, :], mask=bk_mask, other=0.0).to(tl.float32)
    bk_rh = bk_rh * tl.where(first_half, -1.0, 1.0)[None, :]
    freq = tl.load(inv_freq_ptr + tl.where(first_half, offs_d, offs_d - HALF), mask=d_mask, other=0.0)

    heads = b * (n_kv * G) + h * G + offs_g  # rows of q and of the partial outputs
    q = tl.load(q_ptr + heads[:, None] * D + offs_d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    q = q.to(tl.float32) * qk_scale

    cache_row = b * n_kv + h
    ck_rows = ck_ptr + cache_row * max_len * R_K
    cv_rows = cv_ptr + cache_row * max_len * R_V
    ck_scales = ck_scale_ptr + cache_row * max_len
    cv_scales = cv_scale_ptr + cache_row * max_len

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_RV], tl.float32)
    for n0 in range(start, end, BLOCK):  # no iteration for an empty slice: (m, l, o) = (-inf, 0, 0)
        tok = n0 + offs_n
        tok_mask = tok < end
        c_k = _load_latent_tile(ck_rows, ck_scales, tok, tok_mask, R_K, BLOCK_RK, HAS_CK_SCALE)
        k = tl.dot(c_k, bk, input_precision="ieee")
        k_rh = tl.dot(c_k, bk_rh, input_precision="ieee")
        angle = tok.to(tl.float32)[:, None] * freq[None, :]
        k = k * tl.cos(angle) + k_rh * tl.sin(angle)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        s = tl.where(tok_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds a valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        c_v = _load_latent_tile(cv_rows, cv_scales, tok, tok_mask, R_V, BLOCK_RV, HAS_CV_SCALE)
        acc = acc * alpha[:, None] + tl.dot(p, c_v, input_precision="ieee")
        m_i = m_new

    part = heads * num_splits + split
    offs_rv = tl.arange(0, BLOCK_RV)
    tl.store(o_ptr + part[:, None] * R_V + offs_rv[None, :], acc, mask=g_mask[:, None] & (offs_rv < R_V)[None, :])
    tl.store(m_ptr + part, m_i, mask=g_mask)
    tl.store(l_ptr + part, l_i, mask=g_mask)


@triton.jit
def _merge_splits_kernel(o_ptr, m_ptr, l_ptr, out_ptr, num_splits,
                         R_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_RV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * n_q + query head
    offs_s = tl.arange(0, BLOCK_S)
    offs_rv = tl.arange(0, BLOCK_RV)
    s_mask = offs_s < num_splits
    rv_mask = offs_rv < R_V
    parts = row * num_splits + offs_s
    m = tl.load(m_ptr + parts, mask=s_mask, other=float("-inf"))
    l = tl.load(l_ptr + parts, mask=s_mask, other=0.0)
    o = tl.load(o_ptr + parts[:, None] * R_V + offs_rv[None, :], mask=s_mask[:, None] & rv_mask[None, :], other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # all slices empty only for length 0
    denom = tl.sum(w * l, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + row * R_V + offs_rv, out, mask=rv_mask)


def default_num_splits(batch_heads: int, max_len: int, target_programs: int = 128, min_split: int = 256) -> int:
    """Slices per sequence: enough (b, h, slice) programs to fill a GPU, none shorter than min_split tokens."""
    return max(1, min(triton.cdiv(target_programs, batch_heads), max_len // min_split))


def _block(n: int) -> int:
    """Power-of-two block covering n, at least 16 (tl.dot's smallest tile side)."""
    return max(16, triton.next_power_of_2(n))


def latent_decode_attention_triton(q, ck, bk, cv, lengths, inv_freq, *, scale, attention_scaling=1.0,
                                   ck_scale=None, cv_scale=None, num_splits=None) -> torch.Tensor:
    """Attention of one new token per sequence over the latent cache: float32 [B, n_q, r_v].

    ``num_splits`` (slices of each sequence, stage 1's third grid axis) defaults to
    :func:`default_num_splits` of B * n_kv and the cache capacity L_max.
    """
    dims = check_latent_args(q, ck, bk, cv, lengths, inv_freq, ck_scale, cv_scale, num_splits)
    if q.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"tensors are on {q.device}: the Triton kernel needs CUDA tensors, "
                         "or TRITON_INTERPRET=1 set before triton is imported")
    if num_splits is None:
        num_splits = default_num_splits(dims.batch * dims.n_kv, dims.max_len)
    out = torch.empty(dims.batch, dims.n_q, dims.r_v, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    ck_scale = ck if ck_scale is None else ck_scale.to(torch.float32).contiguous()  # ck: unread placeholder
    cv_scale = cv if cv_scale is None else cv_scale.to(torch.float32).contiguous()
    o_part = torch.empty(dims.batch, dims.n_q, num_splits, dims.r_v, dtype=torch.float32, device=q.device)
    m_part = torch.empty(dims.batch, dims.n_q, num_splits, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    _latent_split_kernel[(dims.batch, dims.n_kv, num_splits)](
        q.contiguous(), ck.contiguous(), ck_scale, bk.contiguous(), cv.contiguous(), cv_scale,
        lengths.contiguous(), inv_freq.to(torch.float32).contiguous(),
        o_part, m_part, l_part,
        scale * attention_scaling * math.log2(math.e), dims.max_len, dims.n_kv, num_splits,
        G=dims.group, D=dims.head_dim, R_K=dims.r_k, R_V=dims.r_v,
        BLOCK_G=_block(dims.group), BLOCK_D=_block(dims.head_dim), BLOCK_RK=_block(dims.r_k),
        BLOCK_RV=_block(dims.r_v), BLOCK=BLOCK_N,
        HAS_CK_SCALE=ck.dtype == torch.int8, HAS_CV_SCALE=cv.dtype == torch.int8,
    )
    _merge_splits_kernel[(dims.batch * dims.n_q,)](
        o_part, m_part, l_part, out, num_splits,
        R_V=dims.r_v, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_RV=_block(dims.r_v),
    )
    return out

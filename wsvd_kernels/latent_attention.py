"""Fused latent-KV flash-decoding on the tensor cores: K is rebuilt from its pre-RoPE latent on-chip.

The math and argument conventions are those of :mod:`wsvd_kernels.reference`. Shapes: q [B, n_q, D],
ck [B, n_kv, L_max, r_k] (int8: + ck_scale [B, n_kv, L_max]), bk [n_kv, r_k, D], cv [B, n_kv, L_max, r_v]
(int8: + cv_scale), lengths [B], cos/sin [L_rope, D/2] (``cos(j * inv_freq)``, unscaled); out float32
[B, n_q, r_v]. ck/cv may have any batch and head strides (a joint or per-projection latent shared by
every kv head is an ``expand``ed view, head stride 0, never a copy); their rank dim must be contiguous.

Stage 1, grid (n_kv, S, B): program (h, s, b) takes the s-th of S slices of sequence b's valid tokens
(each ceil(lengths[b] / S) rounded up to BLOCK_N). kv head is the fastest grid axis, so the programs
that read one shared latent run together and its tiles come from L2. With B_lo, B_hi = bk[h][:, :D/2],
bk[h][:, D/2:] held for the whole program, per tile of BLOCK_N tokens j (dot operands in the compute
dtype, bf16/fp16 on the tensor cores, fp32 accumulation; int8 latents are exact in bf16 and their
per-token scale multiplies the accumulated rows):

    K_lo = C_K B_lo,  K_hi = C_K B_hi                                  2 r D FLOP per token (tensor cores)
    cos_j, sin_j = cos(n0 f) cos(t f) - sin(n0 f) sin(t f), ...        angle addition, j = n0 + t, t < BLOCK_N:
                                                                       rows n0 and 0..BLOCK_N-1 of the tables
    s  = (a scale log2 e) (Q_lo . (K_lo cos - K_hi sin) + Q_hi . (K_hi cos + K_lo sin))     [G, BLOCK_N]
    online base-2 softmax:  m' = max(m, max_j s),  l = 2^(m-m') l + sum_j 2^(s-m'),
                            o = 2^(m-m') o + 2^(s-m') @ C_V                                  [G, r_v]

The G query heads of kv head h are the M dimension of the score and value dots (padded to 16 rows);
G = 1 (no GQA) instead scores and accumulates as a GEMV on the CUDA cores (no padded rows). One slice:
o / l is written directly. Several: the unnormalised (o, m, l) of each slice, merged by stage 2 (grid
(B n_q,)): out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s, M = max_s m_s.

PAGED (constexpr; :func:`paged_latent_decode_attention_triton`) reads the latents from vLLM-style pages in
place: cache [blocks, P, C] of per-token entries, token j of sequence b at row (block_table[b, j // P], j % P);
kv head h's k channels at entry columns heads[0, h] + i, i < heads[1, h] = r_k,h (masked beyond: the next head's
channels follow; bk rows past r_k,h are zero), v likewise (heads[2], heads[3]); int8 entries hold each head's
float32 scale as 4 bytes at column heads[4, h] (k), heads[5, h] (v), loaded as bytes (any alignment) and
assembled. A tile's rows cost one block-table load per token (int32, from L1/L2: P tokens share it); the
strided variant reads ck[b, h, j] at its strides instead.

No trigonometry runs in the kernel (precise per-element cos/sin spill to local memory): the tables are
the model's own fp32 values, row n0 is one [D/2] load per tile and rows 0..BLOCK_N-1 stay in L1.
float32 inputs run the same code with fp32 ("ieee") dots on the CUDA cores: a reference path, not the
deployment one.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .reference import check_latent_args, check_paged_args

INTERPRETED = triton.knobs.runtime.interpret  # read when the kernels below are decorated
# Launch configurations the autotuner picks from on CUDA (keyed on the shape); the static check
# (wsvd_kernels/static_check.py) compiles every one. Under the interpreter the first one runs.
# Only spill-free ones (Triton 3.9: 64 tokens with 4 warps, or 128 tokens, spill on sm_90; on sm_80
# 64 tokens spill, and 32 tokens with 4 warps at an odd rank and int8: only the 2nd and 3rd run there).
CONFIGS = [
    triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=3),
]


MAX_RANK = 256  # latent ranks above this exceed shared memory / registers: the op runs its PyTorch path


def configs_for(arch: int, block_r: int = 64) -> list[triton.Config]:
    """The configurations the autotuner tries on sm_<arch> (e.g. 90 for H100/H200) for latent blocks of
    ``block_r`` = max(BLOCK_RK, BLOCK_RV) columns (64-token tiles only up to 64: they spill above)."""
    configs = CONFIGS if arch >= 90 else CONFIGS[1:3]
    return [c for c in configs if c.kwargs["BLOCK_N"] < 64 or block_r <= 64]
MIN_SPLIT_TOKENS = 256  # no slice shorter than this
PROGRAMS_PER_SM = 2  # target stage-1 programs per SM at small batch
DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _round(x, DOT: tl.constexpr, EMULATE: tl.constexpr):
    """x (any dtype) rounded to DOT, to nearest even. EMULATE (the interpreter with bf16 DOT): the result
    stays fp32, rounded with integer arithmetic, because the interpreter casts int8 to bf16 bit-wise,
    truncates fp32 to bf16, and its dot multiplies the raw bits of bf16 operands."""
    if DOT == tl.float32:
        return x.to(tl.float32)
    if EMULATE:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(DOT)


@triton.jit
def _dot(a, b, acc, DOT: tl.constexpr, EMULATE: tl.constexpr):
    """``a @ b + acc``: operands rounded to DOT, fp32 accumulation (tensor cores for bf16/fp16)."""
    return tl.dot(_round(a, DOT, EMULATE), _round(b, DOT, EMULATE), acc, input_precision="ieee")


@triton.jit
def _load_scales(ptrs, mask, BYTES: tl.constexpr):
    """float32 scales at ``ptrs`` [BLOCK_N] (0 where masked); BYTES: each is 4 little-endian bytes of an int8 cache
    entry, at any alignment, assembled as bits = sum_i byte_i 2^(8 i)."""
    if BYTES:
        offs = tl.arange(0, 4)
        raw = tl.load(ptrs[:, None] + offs[None, :], mask=mask[:, None], other=0)
        bits = raw.to(tl.uint8, bitcast=True).to(tl.uint32) << (8 * offs[None, :]).to(tl.uint32)
        scales = tl.sum(bits, axis=1).to(tl.float32, bitcast=True)
    else:
        scales = tl.load(ptrs, mask=mask, other=0.0)
    return scales


@triton.jit
def latent_split_kernel(
    q_ptr, ck_ptr, ck_scale_ptr, bk_ptr, cv_ptr, cv_scale_ptr, lengths_ptr, cos_ptr, sin_ptr,
    table_ptr, heads_ptr, o_ptr, m_ptr, l_ptr,
    qk_scale, max_len, rope_len, num_splits, stride_table_b, stride_page, stride_row,
    stride_ck_b, stride_ck_h, stride_ck_l, stride_cks_b, stride_cks_h, stride_cks_l,
    stride_cv_b, stride_cv_h, stride_cv_l, stride_cvs_b, stride_cvs_h, stride_cvs_l,
    G: tl.constexpr, HALF: tl.constexpr, R_K: tl.constexpr, R_V: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_RK: tl.constexpr, BLOCK_RV: tl.constexpr,
    HAS_CK_SCALE: tl.constexpr, HAS_CV_SCALE: tl.constexpr, DOT: tl.constexpr, EMULATE: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    h = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # int64: cache offsets may pass 2**31
    n_kv = tl.num_programs(0)
    length = tl.minimum(tl.load(lengths_ptr + b), max_len)
    split_len = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, length)
    USE_DOT: tl.constexpr = BLOCK_G >= 16  # else G == 1: GEMV on the CUDA cores

    offs_g = tl.arange(0, BLOCK_G)
    offs_h = tl.arange(0, BLOCK_H)
    offs_rk = tl.arange(0, BLOCK_RK)
    offs_rv = tl.arange(0, BLOCK_RV)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < G
    h_mask = offs_h < HALF

    # B_lo, B_hi [BLOCK_RK, BLOCK_H]: bk[h] split at D/2 (zero padded)
    bk_rows = bk_ptr + h * (R_K * 2 * HALF) + offs_rk[:, None] * (2 * HALF) + offs_h[None, :]
    bk_mask = (offs_rk < R_K)[:, None] & h_mask[None, :]
    b_lo = _round(tl.load(bk_rows, mask=bk_mask, other=0.0), DOT, EMULATE)
    b_hi = _round(tl.load(bk_rows + HALF, mask=bk_mask, other=0.0), DOT, EMULATE)

    heads = b * (n_kv * G) + h * G + offs_g  # rows of q and of the outputs
    q_rows = q_ptr + heads[:, None] * (2 * HALF) + offs_h[None, :]
    q_mask = g_mask[:, None] & h_mask[None, :]
    q_lo = tl.load(q_rows, mask=q_mask, other=0.0).to(tl.float32) * qk_scale  # [BLOCK_G, BLOCK_H]
    q_hi = tl.load(q_rows + HALF, mask=q_mask, other=0.0).to(tl.float32) * qk_scale

    if PAGED:  # one cache of entries; head h's columns, ranks and scale bytes from heads [6, n_kv]
        col_k = tl.load(heads_ptr + h)
        rank_k = tl.load(heads_ptr + n_kv + h)
        col_v = tl.load(heads_ptr + 2 * n_kv + h)
        rank_v = tl.load(heads_ptr + 3 * n_kv + h)
        col_ks = tl.load(heads_ptr + 4 * n_kv + h)
        col_vs = tl.load(heads_ptr + 5 * n_kv + h)
    else:
        col_k, col_v, col_ks, col_vs = 0, 0, 0, 0
        rank_k, rank_v = R_K, R_V
    ck_base = ck_ptr + b * stride_ck_b + h * stride_ck_h + col_k
    cv_base = cv_ptr + b * stride_cv_b + h * stride_cv_h + col_v
    cks_base = ck_scale_ptr + b * stride_cks_b + h * stride_cks_h + col_ks
    cvs_base = cv_scale_ptr + b * stride_cvs_b + h * stride_cvs_h + col_vs
    rk_mask = (offs_rk < rank_k)[None, :]  # paged: the next head's channels follow head h's r_k,h
    rv_mask = (offs_rv < rank_v)[None, :]
    # in-tile rotations cos(t f), sin(t f), t < BLOCK_N: the same rows for every tile (L1)
    t_rows = offs_n[:, None] * HALF + offs_h[None, :]
    t_mask = (offs_n < rope_len)[:, None] & h_mask[None, :]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_RV], tl.float32)
    for n0 in range(start, end, BLOCK_N):  # no iteration for an empty slice: (m, l, o) = (-inf, 0, 0)
        tok = n0 + offs_n
        tok_mask = tok < end
        if PAGED:  # the token's row in the cache: page block_table[b, tok // PAGE], slot tok % PAGE
            page = tl.load(table_ptr + b * stride_table_b + tok // PAGE, mask=tok_mask, other=0)
            row = page.to(tl.int64) * stride_page + (tok % PAGE) * stride_row
        else:
            row = tok
        c_k = tl.load(ck_base + row[:, None] * stride_ck_l + offs_rk[None, :], mask=tok_mask[:, None] & rk_mask,
                      other=0)
        zero = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
        k_lo = _dot(c_k, b_lo, zero, DOT, EMULATE)  # [BLOCK_N, BLOCK_H] fp32
        k_hi = _dot(c_k, b_hi, zero, DOT, EMULATE)
        if HAS_CK_SCALE:
            sk = _load_scales(cks_base + row * stride_cks_l, tok_mask, PAGED)[:, None]
            k_lo = k_lo * sk
            k_hi = k_hi * sk
        c0 = tl.load(cos_ptr + n0 * HALF + offs_h, mask=h_mask, other=0.0)[None, :]
        s0 = tl.load(sin_ptr + n0 * HALF + offs_h, mask=h_mask, other=0.0)[None, :]
        ct = tl.load(cos_ptr + t_rows, mask=t_mask, other=0.0)
        st = tl.load(sin_ptr + t_rows, mask=t_mask, other=0.0)
        cos = c0 * ct - s0 * st
        sin = s0 * ct + c0 * st
        r_lo = k_lo * cos - k_hi * sin
        r_hi = k_hi * cos + k_lo * sin
        if USE_DOT:
            s = _dot(q_lo, tl.trans(r_lo), tl.zeros([BLOCK_G, BLOCK_N], tl.float32), DOT, EMULATE)
            s = _dot(q_hi, tl.trans(r_hi), s, DOT, EMULATE)  # [BLOCK_G, BLOCK_N]
        else:
            s = tl.sum(r_lo * q_lo + r_hi * q_hi, axis=1)[None, :]  # q [1, BLOCK_H] broadcast over tokens
        s = tl.where(tok_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds a valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_CV_SCALE:  # p @ (diag(scale) C_V) = (p diag(scale)) @ C_V
            p = p * _load_scales(cvs_base + row * stride_cvs_l, tok_mask, PAGED)[None, :]
        v_rows = cv_base + row[:, None] * stride_cv_l + offs_rv[None, :]
        v_mask = tok_mask[:, None] & rv_mask
        if USE_DOT:
            c_v = tl.load(v_rows, mask=v_mask, other=0)
            acc = _dot(p, c_v, acc * alpha[:, None], DOT, EMULATE)
        else:
            c_v = tl.load(v_rows, mask=v_mask, other=0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(tl.trans(p) * c_v, axis=0)[None, :]
        m_i = m_new

    out_mask = g_mask[:, None] & (offs_rv < R_V)[None, :]
    if SINGLE_SPLIT:  # o_ptr is the output; l = 0 only for length 0, where acc = 0
        tl.store(o_ptr + heads[:, None] * R_V + offs_rv[None, :], acc / tl.where(l_i > 0, l_i, 1.0)[:, None],
                 mask=out_mask)
    else:
        part = heads * num_splits + split
        tl.store(o_ptr + part[:, None] * R_V + offs_rv[None, :], acc, mask=out_mask)
        tl.store(m_ptr + part, m_i, mask=g_mask)
        tl.store(l_ptr + part, l_i, mask=g_mask)


def _prune_for_device(configs, named_args, **kwargs):
    major, minor = torch.cuda.get_device_capability()
    allowed = configs_for(10 * major + minor, max(kwargs["BLOCK_RK"], kwargs["BLOCK_RV"]))
    return [c for c in configs if c in allowed]


# kv-head count, splits and batch are the grid; the rest of the shape is in the constexprs
autotuned_split_kernel = triton.autotune(CONFIGS, key=["max_len", "num_splits"],
                                          prune_configs_by={"early_config_prune": _prune_for_device})(latent_split_kernel)


@triton.jit
def merge_splits_kernel(o_ptr, m_ptr, l_ptr, out_ptr, num_splits,
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


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(batch_heads: int, max_len: int, sm_count: int = 132) -> int:
    """Slices per sequence: about PROGRAMS_PER_SM programs per SM, no slice under MIN_SPLIT_TOKENS tokens.

    ``sm_count`` defaults to an H100 SXM's 132 (the launcher passes the device's own count).
    """
    wanted = triton.cdiv(PROGRAMS_PER_SM * sm_count, max(1, batch_heads))
    return max(1, min(wanted, triton.cdiv(max_len, MIN_SPLIT_TOKENS)))


def _block(n: int, least: int = 16) -> int:
    """Power-of-two block covering n, at least ``least`` (tl.dot's smallest tile side is 16)."""
    return max(least, triton.next_power_of_2(n))


def _arguments(dims, q, bk, lengths, cos, sin, latents, ints, *, scale, attention_scaling, has_scales: tuple, page,
               num_splits, sm_count):
    """What both launch kinds share: compute dtype, slices, (o, m, l) buffers, positional args, constexprs.

    ``latents``: (ck, ck_scale, cv, cv_scale, block_table, heads) pointers; ``ints``: (table, page and row strides,
    then batch, head and token strides of ck, ck_scale, cv, cv_scale); ``page``: tokens per page (None: strided)."""
    if max(dims.r_k, dims.r_v) > MAX_RANK:
        raise ValueError(f"latent ranks r_k={dims.r_k}, r_v={dims.r_v}: the Triton kernel takes ranks up to "
                         f"{MAX_RANK}; use the PyTorch implementation (the op falls back to it)")
    if num_splits is None:
        num_splits = default_num_splits(dims.batch * dims.n_kv, dims.max_len, sm_count)
    compute = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float32
    q, bk = q.to(compute).contiguous(), bk.to(compute).contiguous()  # small: [B, n_q, D], [n_kv, r_k, D]
    cos, sin = (t.to(torch.float32).contiguous() for t in (cos, sin))
    out = torch.empty(dims.batch, dims.n_q, dims.r_v, dtype=torch.float32, device=q.device)
    single = num_splits == 1
    parts = (out, out, out) if single else (
        torch.empty(dims.batch, dims.n_q, num_splits, dims.r_v, dtype=torch.float32, device=q.device),
        *(torch.empty(dims.batch, dims.n_q, num_splits, dtype=torch.float32, device=q.device) for _ in range(2)))
    ck, ck_s, cv, cv_s, table, heads = latents
    args = (q, ck, ck_s, bk, cv, cv_s, lengths, cos, sin, table, heads, *parts,
            scale * attention_scaling * math.log2(math.e), dims.max_len, cos.shape[0], num_splits, *ints)
    constexprs = dict(G=dims.group, HALF=dims.head_dim // 2, R_K=dims.r_k, R_V=dims.r_v,
                      BLOCK_G=1 if dims.group == 1 else _block(dims.group), BLOCK_H=_block(dims.head_dim // 2),
                      BLOCK_RK=_block(dims.r_k), BLOCK_RV=_block(dims.r_v),
                      HAS_CK_SCALE=has_scales[0], HAS_CV_SCALE=has_scales[1],
                      DOT=DOT_DTYPES[compute], EMULATE=INTERPRETED and compute == torch.bfloat16,
                      SINGLE_SPLIT=single, PAGED=page is not None, PAGE=page or 1)
    return (dims.n_kv, num_splits, dims.batch), args, constexprs, num_splits, parts, out


def kernel_arguments(q, ck, bk, cv, lengths, cos, sin, *, scale, attention_scaling=1.0, ck_scale=None,
                     cv_scale=None, num_splits=None, sm_count=132):
    """(stage-1 grid, positional args, constexpr kwargs, num_splits, (o, m, l) buffers, out) of one strided call.

    Shared by the launcher and the static check (:mod:`wsvd_kernels.static_check`), so both see the same
    specialisation: dtypes, strides, constexprs.
    """
    dims = check_latent_args(q, ck, bk, cv, lengths, cos, sin, ck_scale, cv_scale, num_splits)
    ck, cv = (c if c.stride(-1) == 1 else c.contiguous() for c in (ck, cv))  # head/batch strides stay (shared latents)
    ck_s, cv_s = ((ck if s is None else s.to(torch.float32)) for s in (ck_scale, cv_scale))  # ck: unread placeholder
    ck_s, cv_s = ((s if s.stride(-1) == 1 else s.contiguous()) for s in (ck_s, cv_s))
    ints = (0, 0, 0, *(t.stride(i) for t in (ck, ck_s, cv, cv_s) for i in range(3)))
    return _arguments(dims, q, bk, lengths, cos, sin, (ck, ck_s, cv, cv_s, lengths, lengths), ints, scale=scale,
                      attention_scaling=attention_scaling, has_scales=(ck_scale is not None, cv_scale is not None),
                      page=None, num_splits=num_splits, sm_count=sm_count)


def paged_kernel_arguments(q, cache, block_table, lengths, bk, heads, cos, sin, *, max_len, width_v, scale,
                           attention_scaling=1.0, num_splits=None, sm_count=132):
    """:func:`kernel_arguments` of a paged call (:func:`paged_latent_decode_attention_triton`): the kernel reads
    ``cache`` through ``block_table`` and ``heads``, no copy of it."""
    dims = check_paged_args(q, cache, block_table, lengths, bk, heads, cos, sin, max_len, width_v, num_splits)
    if cache.stride(-1) != 1:
        raise ValueError(f"cache entries must be contiguous (column stride 1), got strides {cache.stride()}")
    heads = heads.to(torch.int32).contiguous()
    ints = (block_table.stride(0), cache.stride(0), cache.stride(1), *(0, 0, 1) * 4)
    return _arguments(dims, q, bk, lengths, cos, sin, (cache, cache, cache, cache, block_table, heads), ints,
                      scale=scale, attention_scaling=attention_scaling, has_scales=(cache.dtype == torch.int8,) * 2,
                      page=cache.shape[1], num_splits=num_splits, sm_count=sm_count)


def _launch(grid, args, constexprs, num_splits, parts, out, config) -> torch.Tensor:
    """Stage 1 (autotuned on CUDA unless ``config`` pins one), then stage 2 when there are several slices."""
    if out.numel() == 0:
        return out
    if config is None and not INTERPRETED:
        autotuned_split_kernel[grid](*args, **constexprs)
    else:
        config = config or CONFIGS[0]
        latent_split_kernel[grid](*args, **constexprs, **config.kwargs, num_warps=config.num_warps,
                                   num_stages=config.num_stages)
    if num_splits > 1:
        r_v = out.shape[-1]
        merge_splits_kernel[(out.shape[0] * out.shape[1],)](
            *parts, out, num_splits, R_V=r_v, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_RV=_block(r_v, 1))
    return out


def _device_sm_count(q: torch.Tensor) -> int:
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"tensors are on {q.device}: the Triton kernel needs CUDA tensors, "
                         "or TRITON_INTERPRET=1 set before triton is imported")
    return _sm_count(q.device.index or 0) if q.device.type == "cuda" else 132


def latent_decode_attention_triton(q, ck, bk, cv, lengths, cos, sin, *, scale, attention_scaling=1.0,
                                   ck_scale=None, cv_scale=None, num_splits=None, config=None) -> torch.Tensor:
    """Attention of one new token per sequence over the latent cache: float32 [B, n_q, r_v].

    ``num_splits`` (slices of each sequence) defaults to :func:`default_num_splits` of B * n_kv, the
    cache capacity L_max and the device's SM count. ``config`` (one of :data:`CONFIGS`) pins the launch
    configuration; by default it is autotuned on CUDA and ``CONFIGS[0]`` under the interpreter.
    """
    sm_count = _device_sm_count(q)
    return _launch(*kernel_arguments(q, ck, bk, cv, lengths, cos, sin, scale=scale,
                                     attention_scaling=attention_scaling, ck_scale=ck_scale, cv_scale=cv_scale,
                                     num_splits=num_splits, sm_count=sm_count), config)


def paged_latent_decode_attention_triton(q, cache, block_table, lengths, bk, heads, cos, sin, *, max_len, width_v,
                                         scale, attention_scaling=1.0, num_splits=None, config=None) -> torch.Tensor:
    """:func:`latent_decode_attention_triton` reading the latents from vLLM-style pages in place: float32
    [B, n_q, width_v]. The math and arguments are :func:`wsvd_kernels.reference.paged_latent_decode_attention_torch`'s
    (``max_len`` >= every length bounds the slices)."""
    sm_count = _device_sm_count(q)
    return _launch(*paged_kernel_arguments(q, cache, block_table, lengths, bk, heads, cos, sin, max_len=max_len,
                                           width_v=width_v, scale=scale, attention_scaling=attention_scaling,
                                           num_splits=num_splits, sm_count=sm_count), config)

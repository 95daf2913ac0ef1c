"""The fused latent-KV decode attention (Triton kernel and PyTorch version) against the float64 reference.

Inputs are random with peaked attention (q scaled so that the scores have a standard deviation
of PEAK, far from uniform), awkward sizes (lengths 1, 63, 65, 4099; ranks 29 and 37 with heads
of lower rank padded with zeros; r_v != r_k) and the latents in float32, bfloat16 or int8. Each
implementation is compared with the reference computed from the same rounded/quantised inputs.
The Triton kernel runs on CUDA, else on the CPU under TRITON_INTERPRET=1.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from wsvd_kernels.latent_attention import CONFIGS as CONFIGS_TRITON
from wsvd_kernels.latent_attention import (
    default_num_splits,
    kernel_arguments,
    latent_decode_attention_triton,
    paged_kernel_arguments,
    paged_latent_decode_attention_triton,
)
from wsvd_kernels.reference import (
    latent_decode_attention_reference,
    latent_decode_attention_torch,
    paged_latent_decode_attention_torch,
)
from wsvd_passes.algorithms.rope import rope_half_tables, rope_tables

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TRITON = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON, reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1")
IMPLS = [pytest.param(latent_decode_attention_triton, id="triton", marks=needs_triton),
         pytest.param(latent_decode_attention_torch, id="torch")]
PEAK = 4.0
DTYPES = ["float32", "bfloat16", "float16", "int8", "int8-bf16"]  # latents (int8-bf16: int8 latents, bf16 q and bk)
BUDGET = 3.0  # low-precision runs may err by this many times a dense decode in their dtype (see assert_matches)


def _quantise(c: torch.Tensor, dtype: str):
    if not dtype.startswith("int8"):
        return c.to(getattr(torch, dtype)), None
    scale = c.abs().amax(dim=-1).clamp_min(1e-6) / 127  # per (token, head)
    return (c / scale[..., None]).round().clamp(-127, 127).to(torch.int8), scale


def _compute_dtype(dtype: str) -> torch.dtype:
    """q and bk dtype of a case: the latents' own, float32 next to int8, bf16 for int8-bf16."""
    return {"int8": torch.float32, "int8-bf16": torch.bfloat16}.get(dtype) or getattr(torch, dtype)


def inv_freq(head_dim: int) -> torch.Tensor:
    return 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def make_case(lengths, *, n_q=6, n_kv=2, head_dim=64, r_k=29, r_v=19, head_ranks=None, dtype="float32",
              attention_scaling=1.0, extra=5, seed=0):
    """Keyword arguments of the three functions; cache capacity max(lengths) + extra."""
    gen = torch.Generator().manual_seed(seed)
    batch, max_len = len(lengths), max(lengths) + extra
    bk = torch.randn(n_kv, r_k, head_dim, generator=gen) / math.sqrt(max(r_k, 1))
    ck = torch.randn(batch, n_kv, max_len, r_k, generator=gen)
    for h, rank in enumerate(head_ranks or []):  # a lossy head of lower rank: zero rows of bk, zero latents
        bk[h, rank:] = 0
        ck[:, h, :, rank:] = 0
    cv = torch.randn(batch, n_kv, max_len, r_v, generator=gen)
    q = torch.randn(batch, n_q, head_dim, generator=gen) * PEAK  # scores ~ N(0, PEAK^2)
    cos, sin = rope_half_tables(inv_freq(head_dim), max_len + 3)  # tables may be longer than the cache
    compute = _compute_dtype(dtype)
    ck, ck_scale = _quantise(ck, dtype)
    cv, cv_scale = _quantise(cv, dtype)
    case = dict(q=q.to(compute), ck=ck, bk=bk.to(compute), cv=cv, lengths=torch.tensor(lengths),
                cos=cos, sin=sin, scale=head_dim**-0.5, attention_scaling=attention_scaling,
                ck_scale=ck_scale, cv_scale=cv_scale)
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def dense_decode(case, dtype: torch.dtype) -> torch.Tensor:
    """What a dense model decoding in ``dtype`` computes on the same inputs: float64 [B, n_q, r_v] of SDPA
    over K = RoPE(C_K bk) (exact, then rounded to dtype, as a dense cache holds it) and V = C_V in dtype."""
    f64 = torch.float64
    q, lengths = case["q"].cpu(), case["lengths"].cpu()
    max_len, half = case["ck"].shape[2], q.shape[-1] // 2
    valid = (torch.arange(max_len) < lengths[:, None])[:, None, :, None]  # rows past a length may hold anything
    ck, cv = ((case[n].cpu().to(f64) * (1 if case[f"{n}_scale"] is None else case[f"{n}_scale"].cpu().to(f64)[..., None]))
              .masked_fill(~valid, 0) for n in ("ck", "cv"))
    cos, sin = (torch.cat([case[n][:max_len]] * 2, dim=-1).cpu().to(f64) * case["attention_scaling"] for n in ("cos", "sin"))
    k = ck @ case["bk"].cpu().to(f64)[None]
    k = k * cos + torch.cat([-k[..., half:], k[..., :half]], dim=-1) * sin
    out = F.scaled_dot_product_attention(q.to(dtype)[:, :, None], k.to(dtype), cv.to(dtype), attn_mask=valid.transpose(2, 3),
                                         scale=case["scale"], enable_gqa=True)[:, :, 0]
    return out.to(f64)


def assert_matches(out, ref, case):
    """float32 compute: within 1e-4 of the output's largest entry. bf16/fp16 compute rounds K and the
    softmax weights P to that dtype before the tensor-core dots, as bf16 flash decoding does; its error
    may be BUDGET times that of a dense decode in the same dtype (:func:`dense_decode`, measured here),
    and no less than 2^-8 (the interpreter rounds to bf16 by truncation, the GPU to nearest)."""
    assert out.dtype == torch.float32 and out.shape == ref.shape
    top = ref.abs().max().clamp_min(1e-3).item()
    dtype = case["q"].dtype
    if dtype == torch.float32:
        atol = 1e-4 * top
    else:
        atol = max(BUDGET * (dense_decode(case, dtype) - ref.cpu()).abs().max().item(), 2**-8 * top)
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), atol=atol, rtol=0)


# (n_q, n_kv, D, r_k, per-head ranks, r_v, attention scaling): GQA 3:1 (dots), and G = 1 (GEMV) with
# D = 128 and an odd rank
CONFIGS = {"gqa3-d64": (6, 2, 64, 29, [29, 17], 19, 1.0), "gqa3-d32": (9, 3, 32, 37, [37, 5, 30], 29, 1.25),
           "mha-d128": (2, 2, 128, 45, [45, 20], 64, 1.0)}


def _config(name):
    n_q, n_kv, head_dim, r_k, head_ranks, r_v, a = CONFIGS[name]
    return dict(n_q=n_q, n_kv=n_kv, head_dim=head_dim, r_k=r_k, head_ranks=head_ranks, r_v=r_v, attention_scaling=a)


def test_reference_matches_dense_rope_attention():
    """The reference agrees with dense SDPA on keys roped by the model's own tables (wsvd_passes.algorithms.rope)."""
    case = make_case([5, 40], **_config("gqa3-d64"))
    q, ck, bk, cv, lengths = (case[k].cpu().double() for k in ("q", "ck", "bk", "cv", "lengths"))
    max_len, half = ck.shape[2], q.shape[-1] // 2
    cos, sin = rope_tables(inv_freq(q.shape[-1]), case["attention_scaling"], max_len)
    k = ck @ bk[None]
    k = k * cos.double() + torch.cat([-k[..., half:], k[..., :half]], dim=-1) * sin.double()
    mask = (torch.arange(max_len) < lengths[:, None])[:, None, None, :]
    dense = F.scaled_dot_product_attention(q[:, :, None], k, cv, attn_mask=mask, scale=case["scale"],
                                           enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(latent_decode_attention_reference(**case).cpu(), dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_mixed_lengths(impl, dtype, config):
    case = make_case([1, 63, 65], dtype=dtype, **_config(config))
    assert_matches(impl(**case), latent_decode_attention_reference(**case), case)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "int8-bf16"])
def test_long_sequence(impl, dtype):
    case = make_case([4099], n_q=6, n_kv=2, head_dim=64, r_k=37, head_ranks=[37, 30], r_v=29, dtype=dtype, extra=0)
    assert_matches(impl(**case), latent_decode_attention_reference(**case), case)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8-bf16"])
def test_garbage_beyond_lengths_is_ignored(impl, dtype):
    """Cache rows at and past lengths[b] hold infinities (int8: 127 with an infinite scale)."""
    case = make_case([1, 63, 65], dtype=dtype, extra=40, **_config("gqa3-d64"))
    clean = impl(**case)
    for b, n in enumerate(case["lengths"].tolist()):
        for name in ("ck", "cv"):
            c = case[name]
            c[b, :, n:] = 127 if c.dtype == torch.int8 else float("inf")
            if c.dtype == torch.int8:
                case[f"{name}_scale"][b, :, n:] = float("inf")
    dirty = impl(**case)
    assert torch.isfinite(dirty).all()
    torch.testing.assert_close(dirty, clean, atol=0, rtol=0)
    assert_matches(dirty, latent_decode_attention_reference(**case), case)


@needs_triton
def test_num_splits_agree():
    """1 slice, and 3 or 7 slices of which many are empty (length 1 has 6 empty of 7), agree."""
    case = make_case([1, 63, 65, 130], **_config("gqa3-d32"))
    ref = latent_decode_attention_reference(**case)
    one = latent_decode_attention_triton(**case, num_splits=1)
    assert_matches(one, ref, case)
    for num_splits in (3, 7):
        out = latent_decode_attention_triton(**case, num_splits=num_splits)
        torch.testing.assert_close(out, one, atol=1e-6 * ref.abs().max().item(), rtol=0)


@needs_triton
@pytest.mark.parametrize("config", CONFIGS_TRITON, ids=lambda c: f"block{c.kwargs['BLOCK_N']}-w{c.num_warps}")
@pytest.mark.parametrize("dtype", ["float32", "int8-bf16"])
def test_launch_configs_agree(config, dtype):
    """Every configuration the autotuner may pick gives the reference's result (tiles of 32..128 tokens,
    one and several slices)."""
    case = make_case([1, 130, 257], dtype=dtype, **_config("gqa3-d64"))
    ref = latent_decode_attention_reference(**case)
    for num_splits in (1, 3):
        assert_matches(latent_decode_attention_triton(**case, num_splits=num_splits, config=config), ref, case)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", ["gqa3-d64", "mha-d128"])
def test_shared_latent_is_read_in_place(impl, config):
    """A joint/per-projection latent read by every kv head is an expanded view (head stride 0): same
    result as per-head copies, and the launcher passes it on without copying."""
    case = make_case([7, 40], **_config(config))
    for name in ("ck", "cv"):
        case[name] = case[name][:, :1].expand_as(case[name])
    assert case["ck"].stride(1) == 0
    ref = latent_decode_attention_reference(**case)
    assert_matches(impl(**case), ref, case)
    _, args, *_ = kernel_arguments(**{k: v for k, v in case.items()})
    assert args[1].stride(1) == 0 and args[4].stride(1) == 0 and args[1].data_ptr() == case["ck"].data_ptr()


def test_default_num_splits_fills_the_gpu():
    """About two programs per SM at small batch, one slice once the batch fills the GPU, none under
    MIN_SPLIT_TOKENS tokens."""
    assert default_num_splits(4 * 32, 8192, sm_count=132) == 3  # 384 programs for 132 SMs
    assert default_num_splits(16 * 32, 8192, sm_count=132) == 1
    assert default_num_splits(1, 300, sm_count=132) == 2
    assert default_num_splits(1, 100, sm_count=132) == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    case = make_case([20, 9], **_config("gqa3-d64"))
    ref = latent_decode_attention_reference(**case)
    case["q"] = case["q"].transpose(0, 1).contiguous().transpose(0, 1)
    case["ck"] = torch.cat([case["ck"], case["ck"]], dim=-1)[..., : case["ck"].shape[-1]]
    case["bk"] = case["bk"].transpose(1, 2).contiguous().transpose(1, 2)
    case["cv"] = case["cv"].transpose(2, 3).contiguous().transpose(2, 3)
    assert not any(case[k].is_contiguous() for k in ("q", "ck", "bk", "cv"))
    assert_matches(impl(**case), ref, case)


def _bad(case, **changes):
    return {**case, **changes}


BAD_INPUTS = {
    "int8 without scale": (lambda c: _bad(c, ck=c["ck"].to(torch.int8)), "ck is int8 but ck_scale is missing"),
    "scale for float latents": (lambda c: _bad(c, cv_scale=c["cv"][..., 0]), "cv_scale is given"),
    "n_q not a multiple": (lambda c: _bad(c, q=c["q"][:, :5]), "not a multiple of n_kv"),
    "odd head dim": (lambda c: _bad(c, q=c["q"][..., :63]), "must be even"),
    "bk shape": (lambda c: _bad(c, bk=c["bk"][:, :28]), "bk must be"),
    "cv batch": (lambda c: _bad(c, cv=c["cv"][:1]), "cv must be"),
    "lengths shape": (lambda c: _bad(c, lengths=c["lengths"][:1]), "lengths must be"),
    "float lengths": (lambda c: _bad(c, lengths=c["lengths"].float()), "lengths must be an integer"),
    "cos width": (lambda c: _bad(c, cos=c["cos"][:, :31]), "cos must be"),
    "sin too short": (lambda c: _bad(c, sin=c["sin"][:4]), "sin must be"),
    "num_splits": (lambda c: _bad(c, num_splits=0), "num_splits must be >= 1"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", list(BAD_INPUTS))
def test_bad_inputs_raise(impl, bad):
    make_bad, message = BAD_INPUTS[bad]
    with pytest.raises(ValueError, match=message):
        impl(**make_bad(make_case([3, 4], **_config("gqa3-d64"))))


@settings(max_examples=12, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=3),
    n_kv=st.integers(1, 3),
    group=st.integers(1, 3),
    half_dim=st.integers(1, 12),
    r_k=st.integers(1, 20),
    r_v=st.integers(1, 20),
    dtype=st.sampled_from(DTYPES),
    num_splits=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_property_small_shapes(lengths, n_kv, group, half_dim, r_k, r_v, dtype, num_splits, seed):
    """The PyTorch version (and the Triton kernel where it runs) match the reference, length 0 included."""
    case = make_case(lengths, n_q=n_kv * group, n_kv=n_kv, head_dim=2 * half_dim, r_k=r_k, r_v=r_v,
                     dtype=dtype, extra=3, seed=seed)
    ref = latent_decode_attention_reference(**case)
    assert_matches(latent_decode_attention_torch(**case), ref, case)
    if TRITON:
        assert_matches(latent_decode_attention_triton(**case, num_splits=num_splits), ref, case)


PAGED_IMPLS = [pytest.param(paged_latent_decode_attention_triton, id="triton", marks=needs_triton),
               pytest.param(paged_latent_decode_attention_torch, id="torch")]


def paged_case(case, *, page_size=4, shared=False, seed=1):
    """The strided case moved into shuffled pages of packed entries, as vLLM's latent cache holds them, and the
    strided case it equals (per-head v ranks r_v - 7 h, v latents zeroed beyond them). An entry (one token): head
    h's r_k,h k channels for every h (one latent for all: ``shared``), int8: their float32 scales as 4 bytes per
    head, then the same for v, one spare column; offsets unaligned. Rows past a length and unused pages hold
    NaN (int8: 127 and NaN-scale bytes)."""
    gen = torch.Generator().manual_seed(seed)
    ck, cv = case["ck"].clone(), case["cv"].clone()
    batch, n_kv, max_len, r_k = ck.shape
    r_v = cv.shape[-1]
    int8 = ck.dtype == torch.int8
    ranks_k = torch.count_nonzero(case["bk"].abs().sum(-1), dim=1).tolist()  # zero rows of bk past r_k,h
    ranks_v = [max(1, r_v - 7 * h) for h in range(n_kv)]
    for h, r in enumerate(ranks_v):
        cv[:, h, :, r:] = 0
    stored = 1 if shared else n_kv
    if shared:
        ck, cv = ck[:, :1].expand_as(ck), cv[:, :1].expand_as(cv)
        ranks_k, ranks_v = [r_k] * n_kv, [r_v] * n_kv
    parts, rows, width = [], {}, 0
    for c, ranks, name in ((ck, ranks_k, "ck"), (cv, ranks_v, "cv")):
        cols = [0] * n_kv if shared else torch.tensor([0, *ranks[:-1]]).cumsum(0).tolist()
        parts += [c[:, h, :, :ranks[h]].cpu() for h in range(stored)]
        scale_col = width + sum(ranks[:stored])
        rows[name] = [width + col for col in cols], ranks, [scale_col + 4 * (0 if shared else h) for h in range(n_kv)]
        width = scale_col
        if int8:
            parts.append(case[f"{name}_scale"][:, :stored].transpose(1, 2).contiguous().cpu().view(torch.int8))
            width += 4 * stored
    heads = [*rows["ck"][:2], *rows["cv"][:2], rows["ck"][2], rows["cv"][2]]
    entries = torch.cat([*parts, torch.zeros(batch, max_len, 1, dtype=ck.dtype)], dim=-1)  # [B, L, C]
    blocks = -(-max_len // page_size)
    table = torch.randperm(batch * blocks + 3, generator=gen)[:batch * blocks].view(batch, blocks)
    cache = torch.full((batch * blocks + 3, page_size, entries.shape[-1]), 127 if int8 else float("nan"),
                       dtype=ck.dtype)
    j = torch.arange(max_len)
    valid = j < case["lengths"].cpu()[:, None]  # [B, L]
    slots = table[:, j // page_size] * page_size + j % page_size
    cache.view(-1, entries.shape[-1])[slots[valid]] = entries[valid]
    strided = {**case, "ck": ck.contiguous(), "cv": cv.contiguous()}
    if shared:
        strided.update({n: strided[n][:, :1].expand_as(strided[n]).contiguous() for n in ("ck_scale", "cv_scale")
                        if strided[n] is not None})
    paged = {"q": case["q"], "cache": cache.to(DEVICE), "block_table": table.to(torch.int32).to(DEVICE),
             "lengths": case["lengths"], "bk": case["bk"], "heads": torch.tensor(heads, dtype=torch.int32).to(DEVICE),
             "cos": case["cos"], "sin": case["sin"], "max_len": max_len, "width_v": r_v, "scale": case["scale"],
             "attention_scaling": case["attention_scaling"]}
    return paged, strided


@pytest.mark.parametrize("impl", PAGED_IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8-bf16"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_paged_equals_the_reference(impl, dtype, config):
    """The latents read from shuffled pages of packed entries (unequal per-head ranks of any size, GQA 3:1 and
    G = 1, lengths 1, 6 and 11 over pages of 4 tokens, float, bf16 and int8 entries with their scales as bytes)
    give the float64 reference of the same latents held strided."""
    paged, strided = paged_case(make_case([1, 6, 11], dtype=dtype, **_config(config)))
    out = impl(**paged)
    assert_matches(out, latent_decode_attention_reference(**strided), strided)


@pytest.mark.parametrize("impl", PAGED_IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "int8-bf16"])
def test_paged_shared_latent_and_splits(impl, dtype):
    """A per-projection latent (one for every kv head: column 0 and one scale for all) in pages of 3 tokens,
    several slices (Triton: 1 and 3), lengths 0, 5, 40."""
    paged, strided = paged_case(make_case([0, 5, 40], dtype=dtype, **_config("gqa3-d64")), page_size=3, shared=True)
    ref = latent_decode_attention_reference(**strided)
    for num_splits in (1, 3):
        assert_matches(impl(**paged, num_splits=num_splits), ref, strided)


def test_paged_kernel_reads_the_pages_in_place():
    """The paged launcher passes the cache and block table to the kernel as they are (no gather)."""
    paged, _ = paged_case(make_case([3, 9], dtype="int8-bf16", **_config("gqa3-d64")))
    _, args, constexprs, *_ = paged_kernel_arguments(**paged)
    assert constexprs["PAGED"] and args[1] is paged["cache"] and args[9] is paged["block_table"]


PAGED_BAD = {
    "cache dims": (lambda c: {**c, "cache": c["cache"][0]}, "cache must be"),
    "table rows": (lambda c: {**c, "block_table": c["block_table"][:1]}, "block_table must be"),
    "max_len": (lambda c: {**c, "max_len": 10**6}, "max_len="),
    "heads": (lambda c: {**c, "heads": c["heads"][:4]}, "heads must be"),
    "bk": (lambda c: {**c, "bk": c["bk"][:, :, :10]}, "bk must be"),
}


@pytest.mark.parametrize("impl", PAGED_IMPLS)
@pytest.mark.parametrize("bad", list(PAGED_BAD))
def test_paged_bad_inputs_raise(impl, bad):
    make_bad, message = PAGED_BAD[bad]
    paged, _ = paged_case(make_case([3, 4], **_config("gqa3-d64")))
    with pytest.raises(ValueError, match=message):
        impl(**make_bad(paged))

"""The latent KV cache in vLLM's paged cache (imported by vLLM only): a layer, its cache spec and its backend.

vLLM 0.32 lets a layer carry its own attention backend (``Attention(attn_backend=...)``; the CPU platform's
``get_attn_backend_cls`` would otherwise give every non-MLA layer ``CPU_ATTN``, a C++ kernel over dense K/V
pages) and declare its own cache spec (``get_kv_cache_spec``). :class:`LatentAttention` declares
``FullAttentionSpec(num_kv_heads=1, head_size=m_k, head_size_v=m_v)``: a page holds per token one latent head
``[c_k (m_k) | c_v (m_v)]``, the real latent channels (:func:`pack_latent`, ``format.latent_cache_layout``:
m_p = sum_h r_p,h for per-head factors, r_p for a per-projection latent), instead of ``[K (D) | V (D)]`` per kv
head, so the same cache memory holds ``2 n_kv D / (m_k + m_v)`` times the tokens. :class:`WsvdLatentBackend`
(registered by the plugin as ``format.LATENT_BACKEND``) writes the latents at their slots and, for request b
with L = seq_lens[b] cached tokens and S new queries (positions L-S .. L-1)::

    c_k, c_v = page rows 0 .. L-1                      [L, m_k], [L, m_v]
    K = RoPE_j(c_k U_k^T (+ b_k)), V = c_v U_v^T (+ b_v)   [L, n_kv, D]  (the layer's ``rebuild``: its own up-projections
                                                           on the unpacked latents and rotary embedding, rotate-half,
                                                           at positions j = 0 .. L-1)
    out[s, i] = softmax_j<=L-S+s(scale q[s, i] . K[j, i // G]) V[j, i // G]      (causal, GQA, G = n_q / n_kv)

``wsvd::latent_attention``'s math (decode) for any number of queries per request, in PyTorch. Requests with one
new query (decode steps) go, when the layer gives a ``decode`` (no k bias), as one batch through
``torch.ops.wsvd.paged_latent_attention`` with the layer's kv_cache and the requests' block-table rows: on CUDA
the Triton flash-decoding kernel reads the latents from the pages in place (each entry once per step), on the
CPU its PyTorch implementation gathers them first.
The cache holds latents in the model dtype, or for quantised recipes bytes (``dtype=torch.int8``): each latent's
int8 codes then its float32 scales (``format.latent_cache_scales``); the backend moves a token's entry as it
is, and the layer's ``rebuild`` decodes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from vllm.model_executor.layers.attention import Attention
from vllm.utils.torch_utils import _encode_layer_name
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

from ..algorithms.quantize import quantize_activation
from .format import LATENT_BACKEND

# (cached c_k [L, m_k], c_v [L, m_v], positions [L]) -> (K [L, n_kv D] with RoPE, V [L, n_kv D])
Rebuild = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (q [B, n_q, D] with RoPE, pages [blocks, P, C], block table [B, blocks], lengths [B], max_len) -> [B, n_q, D]
Decode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def pack_latent(c: torch.Tensor, channels: torch.Tensor, width: int) -> torch.Tensor:
    """c [T, P] (a padded latent) -> [T, width]: its columns ``channels`` [m] in order, then width - m zeros."""
    return torch.nn.functional.pad(c.index_select(-1, channels), (0, width - channels.numel()))


def unpack_latent(c: torch.Tensor, channels: torch.Tensor, padded: int) -> torch.Tensor:
    """[L, width] -> [L, padded]: column i < m back at ``channels[i]``, zeros elsewhere (the inverse of
    :func:`pack_latent` on the kept columns; the up-projection's columns elsewhere are zero)."""
    return c.new_zeros(c.shape[0], padded).index_copy_(-1, channels, c[:, :channels.numel()])


def int8_entry(c: torch.Tensor, bits: int, group: int | None, channels: torch.Tensor, width: int) -> torch.Tensor:
    """c [T, P] (a padded latent, read through the per-token activation quantiser of ``bits`` per ``group``
    features) -> its int8 cache entry [T, width + 4 g] (g = P / group, 1 without groups): the codes of the kept
    ``channels`` (:func:`pack_latent`) then the g float32 scales as bytes."""
    codes, scales = quantize_activation(c, bits, group=group)
    groups = 1 if group is None else c.shape[-1] // group
    return torch.cat([pack_latent(codes, channels, width), scales.reshape(-1, groups).view(torch.int8)], -1)


def int8_latent(entry: torch.Tensor, channels: torch.Tensor, width: int, padded: int, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`int8_entry`: entries [L, width + 4 g] -> the quantised padded latent [L, padded] in
    ``dtype``, codes times their group's scale in float32 as the quantiser computes it (the same values)."""
    scales = entry[:, width:].contiguous().view(torch.float32)  # [L, g]
    codes = unpack_latent(entry[:, :width], channels, padded).view(entry.shape[0], scales.shape[1], -1)
    return (codes.float() * scales[..., None]).flatten(1).to(dtype)


def latent_decode(q: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor,
                  max_len: int, heads: torch.Tensor, up_k: torch.Tensor, up_v: torch.Tensor,
                  bias_v: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per request, q [B, n_q, D] (RoPE applied), over the latents in ``pages`` [blocks, P, C] (request
    b's token j at pages[block_table[b, j // P], j % P]; kv head h's channels, ranks and int8 scales at the columns
    of ``heads`` [6, n_kv], ``format.latent_cache_heads``), ``lengths`` [B] <= max_len cached tokens, up-projections
    up_p [n_kv, D, w_p] (no k bias), b_v [n_kv, D], rotate-half tables cos, sin [>= max_len, D/2] -> [B, n_q, D]:
    ``wsvd::paged_latent_attention`` (bk[h] = U_k,h^T) gives o [B, n_q, w_v], the attention-weighted v latent,
    then out_i = o_i U_v,h^T + b_v,h for query head i of kv head h (the weights sum to 1)."""
    import lowering.ops  # noqa: F401  (registers wsvd::paged_latent_attention)

    B, n_q = q.shape[:2]
    n_kv = up_k.shape[0]
    o = torch.ops.wsvd.paged_latent_attention(q, pages, block_table, lengths, up_k.transpose(1, 2), heads, cos, sin,
                                              scale, 1.0, max_len, up_v.shape[-1])  # float32 [B, n_q, w_v]
    out = torch.einsum("bhgr,hdr->bhgd", o.view(B, n_kv, n_q // n_kv, -1), up_v.float())
    if bias_v is not None:
        out = out + bias_v.float()[:, None]
    return out.flatten(1, 2).to(q.dtype)


class LatentAttention(Attention):
    """vLLM's ``Attention`` whose paged cache holds per token one latent head of ``widths = (m_k, m_v)`` values
    of ``dtype`` (None: the model's); ``rebuild`` turns cached latents into K (with RoPE) and V, ``decode`` (if
    given) attends one query per request over cached latents through ``wsvd::latent_attention``."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, widths: tuple[int, int],
                 rebuild: Rebuild, cache_config, prefix: str, dtype: torch.dtype | None = None,
                 decode: Decode | None = None):
        super().__init__(num_heads, head_size, scale, num_kv_heads=num_kv_heads, cache_config=cache_config,
                         prefix=prefix, attn_backend=WsvdLatentBackend)
        self.width_k, self.width_v = widths
        self.rebuild, self.decode = rebuild, decode
        self.cache_dtype = dtype

    def get_kv_cache_spec(self, vllm_config):
        spec = super().get_kv_cache_spec(vllm_config)
        return dataclasses.replace(spec, num_kv_heads=1, head_size=self.width_k, head_size_v=self.width_v,
                                   dtype=self.cache_dtype or spec.dtype)

    def forward(self, query: torch.Tensor, c_k: torch.Tensor, c_v: torch.Tensor) -> torch.Tensor:
        """query [T, n_q D] (RoPE applied), packed c_k [T, m_k], c_v [T, m_v] -> [T, n_q D].

        vLLM's opaque attention op, as ``Attention.forward`` calls it, with the latents in place of K and V."""
        output = torch.empty_like(query)
        torch.ops.vllm.unified_attention_with_output(
            query.view(-1, self.num_heads, self.head_size), c_k.view(-1, 1, self.width_k),
            c_v.view(-1, 1, self.width_v), output.view(-1, self.num_heads, self.head_size),
            _encode_layer_name(self.layer_name))
        return output


@dataclasses.dataclass
class LatentMetadata:
    num_actual_tokens: int
    query_start_loc: list[int]  # [R + 1], host
    seq_lens: list[int]  # [R] cached tokens per request after this step, host
    block_table: torch.Tensor  # [R, max blocks] block ids
    slot_mapping: torch.Tensor  # [num_actual_tokens] slot = block id * block size + offset (< 0: padding)


class LatentMetadataBuilder(AttentionMetadataBuilder[LatentMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):  # the base __init__ is abstract
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> LatentMetadata:
        m, reqs = common_attn_metadata, common_attn_metadata.num_reqs
        if m.causal is not True:
            raise ValueError("the wsvd latent cache attends causally (decoder layers); this batch asks otherwise")
        return LatentMetadata(m.num_actual_tokens, m.query_start_loc_cpu[:reqs + 1].tolist(),
                              m.seq_lens[:reqs].cpu().tolist(), m.block_table_tensor[:reqs],
                              m.slot_mapping[:m.num_actual_tokens])


class WsvdLatentImpl(AttentionImpl[LatentMetadata]):
    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None):
        unsupported = {"alibi slopes": alibi_slopes is not None, "a sliding window": sliding_window is not None,
                       "a logits soft cap": logits_soft_cap is not None, f"kv cache dtype {kv_cache_dtype}":
                       kv_cache_dtype != "auto", f"attention type {attn_type}": attn_type != AttentionType.DECODER,
                       "kv sharing": kv_sharing_target_layer_name is not None}
        if any(unsupported.values()):
            raise ValueError(f"the wsvd latent kv cache does not support {', '.join(k for k, v in unsupported.items() if v)}"
                             ": export the model with --kv-cache dense")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads, self.kv_cache_dtype = num_kv_heads, kv_cache_dtype

    def forward(self, layer: LatentAttention, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        """query [T, n_q, D], key c_k [T, 1, m_k], value c_v [T, 1, m_v], kv_cache [blocks, 1, block size,
        m_k + m_v] -> output [T, n_q, D] (written in place)."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("the wsvd latent kv cache does not fuse output quantisation")
        if attn_metadata is None:  # profiling run: no cache yet
            return output
        m = attn_metadata
        n = m.num_actual_tokens
        block_size, width_k = kv_cache.shape[2], key.shape[-1]
        slots = m.slot_mapping.long()
        real = slots >= 0
        kv_cache[slots[real] // block_size, :, slots[real] % block_size] = \
            torch.cat([key[:n][real], value[:n][real]], dim=-1).to(kv_cache.dtype)
        steps = [b for b in range(len(m.seq_lens)) if m.query_start_loc[b + 1] - m.query_start_loc[b] == 1]
        if layer.decode is not None and steps:
            rows = torch.tensor([m.query_start_loc[b] for b in steps], device=query.device)
            lengths = torch.tensor([m.seq_lens[b] for b in steps], device=query.device)
            longest = max(m.seq_lens[b] for b in steps)
            table = m.block_table[steps, :-(-longest // block_size)]  # [B, blocks]: the pages are read in place
            output[rows] = layer.decode(query[rows], kv_cache[:, 0], table, lengths, longest)
        for b, length in enumerate(m.seq_lens):
            start, end = m.query_start_loc[b], m.query_start_loc[b + 1]
            if end == start or (layer.decode is not None and end - start == 1):
                continue
            pages = kv_cache[m.block_table[b, :-(-length // block_size)].long()]  # [blocks, 1, block, C]
            latents = pages.transpose(1, 2).flatten(0, 1)[:length]  # [L, 1, C]
            k, v = layer.rebuild(latents[..., :width_k].flatten(1), latents[..., width_k:].flatten(1),
                                 torch.arange(length, device=query.device))
            output[start:end] = causal_attention(query[start:end], k.view(length, -1, self.head_size),
                                                 v.view(length, -1, self.head_size), self.scale)
        return output


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [S, n_q, D] at the last S of L positions, k, v [L, n_kv, D] -> [S, n_q, D]; query head i reads kv head
    i // (n_q / n_kv)."""
    length, queries = k.shape[0], q.shape[0]
    visible = torch.arange(length, device=q.device) <= torch.arange(length - queries, length, device=q.device)[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype), attn_mask=visible,
        scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


class WsvdLatentBackend(AttentionBackend):
    """Attention over vLLM pages of k/v latents (PyTorch; the layer carries it, whatever the platform picks)."""

    forward_includes_kv_cache_update = True  # the impl writes the latents itself
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes = ["auto"]

    @staticmethod
    def get_name() -> str:
        return LATENT_BACKEND

    @staticmethod
    def get_impl_cls():
        return WsvdLatentImpl

    @staticmethod
    def get_builder_cls():
        return LatentMetadataBuilder

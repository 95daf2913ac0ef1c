"""vLLM model classes for directories written by ``wsvd export vllm`` (imported by vLLM only).

vLLM's own Llama model (:class:`vllm.model_executor.models.llama.LlamaForCausalLM`: embeddings, RMSNorm,
LM head, logits processor, weight loading) with a decoder layer whose q/k/v are the factored projections
of the ``wsvd`` config block, for a token t of hidden state x [E] and p in q, k, v::

    head         c_p = x D_p^T [n_p w_p] (one matmul, heads contiguous);  p_h = c_p,h U_p,h^T (+ b_p,h)  [D]
    projection   c_p = x D_p^T [r_p];                                  p = c_p U_p^T (+ b_p)          [n_p D]
    joint        c = x D^T [r] shared by q, k and v;                   p = c U_p^T (+ b_p)

then vLLM's RoPE (``get_rope``, rotate-half) and attention, by the block's ``kv_cache``: ``latent``, vLLM's
paged cache holds the real channels of the (quantised, for quantised recipes) k/v latents, packed per token into
m_p values (``format.latent_cache_layout``: per-head, c_p [T, n_p w] without each head's zero padding beyond
r_p,h, m_p = sum_h r_p,h) and :mod:`.latent_cache` rebuilds K and V from them (:meth:`WsvdAttention.rebuild_kv`);
quantised recipes cache the int8 codes of those channels and one float32 scale per token and group (kv head, or
the whole projection latent; ``format.latent_cache_scales``), the very values the up-projections read, in half the
bytes; ``dense`` (phase 1), K and V are rebuilt before vLLM's ``Attention`` and cached as usual. Tensor parallelism
partitions per-head factors by head (D_p, U_p and b_p rows of the rank's heads; no extra communication; a rank's
latent cache holds its own heads' channels, zero-filled to the widest rank's count, as vLLM wants one page size
per layer on all ranks); a projection or joint latent is computed whole on every rank (replicated D) and U_p is
split by output heads.

Quantised recipes (``activation_bits``): every linear but the LM head reads its input through
:func:`~wsvd_passes.algorithms.quantize.fake_quant_activation`, the very quantiser of the compressed graph (per
token; per token per head for per-head up-projections), and the MLP applies the online Hadamard
``h -> h H`` before down_proj; weights are the artifact's (already quantised, stored dequantised).
Per-token scales need whole rows, so quantised models serve at tensor-parallel size 1.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index
from vllm.model_executor.utils import set_weight_attrs

from ..algorithms.hadamard import FACTOR_NAMES, hadamard_rotate
from ..algorithms.quantize import fake_quant_activation
from .format import SCALE_BYTES, check_block, latent_cache_heads, latent_cache_layout, latent_cache_scales
from .latent_cache import LatentAttention, int8_entry, int8_latent, latent_decode, pack_latent, unpack_latent

ATTENTION_MIN_HEAD_DIM = 32  # the smallest head size of vLLM's CPU attention backend (CPU_ATTN)


def _load_rows(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Weight loader of a tensor split by rows across tensor-parallel ranks (per-head factors)."""
    rows = param.shape[0]
    param.data.copy_(loaded.narrow(0, get_tensor_model_parallel_rank() * rows, rows))


class HeadUp(nn.Module):
    """Per-head up-projections of ``heads`` local heads: weight [heads D, w] (head h: U_h [D, w]), bias [heads D]."""

    def __init__(self, heads: int, head_dim: int, width: int, bias: bool):
        super().__init__()
        self.heads, self.head_dim, self.width = heads, head_dim, width
        self.weight = nn.Parameter(torch.empty(heads * head_dim, width), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": _load_rows})
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(heads * head_dim), requires_grad=False)
            set_weight_attrs(self.bias, {"weight_loader": _load_rows})

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [T, heads w] -> [T, heads D]."""
        c = latent.view(-1, self.heads, self.width)
        out = torch.einsum("thr,hdr->thd", c, self.weight.view(self.heads, self.head_dim, self.width)).flatten(1)
        return out if self.bias is None else out + self.bias


class WsvdAttention(nn.Module):
    def __init__(self, config, block: dict, cache_config, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        index = extract_layer_index(prefix)
        layer = block["layers"][index]
        self.bits = block["activation_bits"]
        self.granularity = block["granularity"]
        E, D = config.hidden_size, block["head_dim"]
        total = {"q": config.num_attention_heads, "k": config.num_key_value_heads, "v": config.num_key_value_heads}
        if total["k"] % tp:
            raise ValueError(f"{total['k']} kv heads do not split over tensor-parallel size {tp}: serve a wsvd model "
                             "with a tensor-parallel size that divides its kv heads")
        if self.bits and tp > 1:
            raise ValueError("a wsvd model with quantised activations (per-token scales over whole rows) serves at "
                             "tensor-parallel size 1")
        self.local = {p: n // tp for p, n in total.items()}
        self.sizes = {p: self.local[p] * D for p in total}
        self.groups = {}
        if self.granularity == "joint":
            self.qkv_down = ReplicatedLinear(E, layer["q"]["width"], bias=False, prefix=f"{prefix}.qkv_down")
        for p in total:
            w = layer[p]["width"]
            if self.granularity == "head":
                setattr(self, f"{p}_down", ColumnParallelLinear(E, total[p] * w, bias=False, prefix=f"{prefix}.{p}_down"))
                setattr(self, f"{p}_up", HeadUp(self.local[p], D, w, block["qkv_bias"]))
                self.groups[p] = w if total[p] > 1 else None
            else:
                if self.granularity == "projection":
                    setattr(self, f"{p}_down", ReplicatedLinear(E, w, bias=False, prefix=f"{prefix}.{p}_down"))
                setattr(self, f"{p}_up", ColumnParallelLinear(w, total[p] * D, bias=block["qkv_bias"],
                                                              prefix=f"{prefix}.{p}_up"))
                self.groups[p] = None
        self.o_proj = RowParallelLinear(total["q"] * D, E, bias=block["o_bias"], prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(D, max_position=config.max_position_embeddings,
                                   rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True)
        self.latent = block["kv_cache"] == "latent"
        if self.latent:
            self.head_dim = self.attn_dim = D
            layout = latent_cache_layout(block, index, tp, get_tensor_model_parallel_rank())
            self.padded = {p: (self.local[p] if self.granularity == "head" else 1) * layer[p]["width"] for p in layout}
            self.cache_widths = {p: width for p, (_, width) in layout.items()}
            self.cache_scales = latent_cache_scales(block, index)  # {}: a float cache
            for p, (channels, _) in layout.items():  # the cached columns of c_p: buffers, on the model's device
                self.register_buffer(f"{p}_cached", torch.tensor(channels, dtype=torch.long), persistent=False)
            entry = {p: self.cache_widths[p] + SCALE_BYTES * self.cache_scales.get(p, 0) for p in "kv"}
            heads = latent_cache_heads(block, index, self.local["k"], tp, get_tensor_model_parallel_rank())
            self.register_buffer("cache_heads", torch.tensor(heads, dtype=torch.int32), persistent=False)
            self.attn = LatentAttention(self.local["q"], D, D**-0.5, self.local["k"], (entry["k"], entry["v"]),
                                        self.rebuild_kv, cache_config, prefix=f"{prefix}.attn",
                                        dtype=torch.int8 if self.cache_scales else None,
                                        decode=None if block["qkv_bias"] else self.decode_latent)
        else:
            # vLLM's CPU attention takes head sizes from 32: smaller heads are zero-padded (q.k and the kept
            # output columns are unchanged; the scale stays D^-1/2)
            self.head_dim, self.attn_dim = D, max(D, ATTENTION_MIN_HEAD_DIM)
            self.attn = Attention(self.local["q"], self.attn_dim, D**-0.5, num_kv_heads=self.local["k"],
                                  cache_config=cache_config, prefix=f"{prefix}.attn")

    def _quant(self, x: torch.Tensor, group: int | None = None) -> torch.Tensor:
        return fake_quant_activation(x, self.bits, group=group) if self.bits else x

    def _linear(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = module(x)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self._quant(hidden_states)
        if self.granularity == "joint":
            latent = self._linear(self.qkv_down, x)
            latents = dict.fromkeys("qkv", latent)
        else:
            latents = {p: self._linear(getattr(self, f"{p}_down"), x) for p in "qkv"}
        q = self._linear(self.q_up, self._quant(latents["q"], self.groups["q"]))
        if self.latent:
            q, _ = self.rotary_emb(positions, q)
            out = self.attn(q, *(self._cache_entry(p, latents[p]) for p in "kv"))
        else:
            k, v = (self._linear(getattr(self, f"{p}_up"), self._quant(latents[p], self.groups[p])) for p in "kv")
            q, k = self.rotary_emb(positions, q, k)
            out = self.attn(*(self._pad(t) for t in (q, k, v)))
            if self.attn_dim != self.head_dim:
                out = out.unflatten(-1, (-1, self.attn_dim))[..., :self.head_dim].flatten(-2)
        return self._linear(self.o_proj, self._quant(out))

    def _cache_entry(self, p: str, latent: torch.Tensor) -> torch.Tensor:
        """What the cache holds per token of c_p [T, n_p w] (padded): the kept channels [T, m_p] of the quantised
        latent the up-projection reads, or their int8 codes and scales [T, m_p + 4 g_p] (:func:`int8_entry`)."""
        channels, width = getattr(self, f"{p}_cached"), self.cache_widths[p]
        if self.cache_scales:
            return int8_entry(latent, self.bits, self.groups[p], channels, width)
        return pack_latent(self._quant(latent, self.groups[p]), channels, width)

    def _cached_latent(self, p: str, entry: torch.Tensor) -> torch.Tensor:
        """Cache entries [L, .] -> the padded latent c_p [L, n_p w] the up-projection reads (:meth:`_cache_entry`
        inverted on the kept channels)."""
        channels, padded = getattr(self, f"{p}_cached"), self.padded[p]
        if self.cache_scales:
            return int8_latent(entry, channels, self.cache_widths[p], padded, getattr(self, f"{p}_up").weight.dtype)
        return unpack_latent(entry, channels, padded)

    def decode_latent(self, q: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor,
                      max_len: int) -> torch.Tensor:
        """One query per request through ``wsvd::paged_latent_attention`` on the layer's pages (:func:`latent_decode`,
        the entries located by ``format.latent_cache_heads``): q [B, n_q, D] (RoPE applied), pages [blocks, P, C],
        block_table [B, >= ceil(max_len / P)], lengths [B] <= max_len -> [B, n_q, D]."""
        n_kv, D = self.local["k"], self.head_dim
        cos, sin = self.rotary_emb.cos_sin_cache.float().chunk(2, dim=-1)
        bias = None if self.v_up.bias is None else self.v_up.bias.view(n_kv, D)
        return latent_decode(q, pages, block_table, lengths, max_len, self.cache_heads,
                             self.k_up.weight.view(n_kv, D, -1), self.v_up.weight.view(n_kv, D, -1), bias, cos, sin,
                             D**-0.5)

    def rebuild_kv(self, c_k: torch.Tensor, c_v: torch.Tensor, positions: torch.Tensor):
        """Cache entries of k and v [L, .] at ``positions`` [L] -> K [L, n_kv D] (RoPE), V [L, n_kv D]: the padded
        latents (:meth:`_cached_latent`), then the up-projections and rotary embedding of :meth:`forward`."""
        k, v = (self._linear(getattr(self, f"{p}_up"), self._cached_latent(p, c)) for p, c in (("k", c_k), ("v", c_v)))
        k, _ = self.rotary_emb(positions, k)
        return k, v

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, heads D] -> [T, heads attn_dim], zero columns appended to every head."""
        if self.attn_dim == self.head_dim:
            return x
        return nn.functional.pad(x.unflatten(-1, (-1, self.head_dim)), (0, self.attn_dim - self.head_dim)).flatten(-2)


class OnlineHadamard(nn.Module):
    """h -> h H from the factors of H (the graph's :func:`~wsvd_passes.algorithms.hadamard.hadamard_rotate`;
    ``orders``: [K, M1, M2] of the block), loaded as ``signs``, ``k``, ``m1``, ``m2``."""

    def __init__(self, orders: list[int]):
        super().__init__()
        k, m1, m2 = orders
        for name, shape in zip(FACTOR_NAMES, [(k * m1 * m2,), (k, k), (m1, m1), (m2, m2)]):
            self.register_parameter(name, nn.Parameter(torch.empty(shape), requires_grad=False))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return hadamard_rotate(h, *(getattr(self, name).to(h.dtype) for name in FACTOR_NAMES))


class WsvdMLP(nn.Module):
    """SwiGLU MLP; quantised recipes: fake-quant inputs and the online Hadamard before down_proj."""

    def __init__(self, config, block: dict, prefix: str):
        super().__init__()
        E, inner, bias = config.hidden_size, config.intermediate_size, block["mlp_bias"]
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r}: the wsvd vLLM plugin serves SwiGLU (silu) MLPs")
        self.bits = block["activation_bits"]
        self.gate_up_proj = MergedColumnParallelLinear(E, [inner] * 2, bias=bias, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(inner, E, bias=bias, prefix=f"{prefix}.down_proj")
        self.down_hadamard = OnlineHadamard(block["online_hadamard"]) if block["online_hadamard"] else None
        self.act_fn = SiluAndMul()

    def _quant(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_activation(x, self.bits) if self.bits else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_up_proj(self._quant(x))[0])
        if self.down_hadamard is not None:
            h = self.down_hadamard(h)
        return self.down_proj(self._quant(h))[0]


class WsvdDecoderLayer(nn.Module):
    """Pre-norm decoder layer (vLLM's fused residual RMSNorm) with :class:`WsvdAttention` and :class:`WsvdMLP`."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        block = config.wsvd
        self.self_attn = WsvdAttention(config, block, vllm_config.cache_config, f"{prefix}.self_attn")
        self.mlp = WsvdMLP(config, block, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class WsvdForCausalLM(LlamaForCausalLM):
    """vLLM's Llama causal LM built from :class:`WsvdDecoderLayer` (Llama, Mistral and Qwen2 families)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        check_block(getattr(vllm_config.model_config.hf_config, "wsvd", None))
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=WsvdDecoderLayer)

"""The latent-KV rewrite of a factored decode graph.

Before (per layer, one new token at cache index t, K/V caches [B, n_kv, L, H]):

    C_k = x D_k^T -> K = C_k U_k^T -> RoPE(t) -> K_cache[:, :, t] = K ─┐
    C_v = x D_v^T -> V = C_v U_v^T ---------> V_cache[:, :, t] = V ─┼─ SDPA(q, K_cache, V_cache) -> o_proj(W_o)

After (caches hold the pre-RoPE latents, [B, n_kv, L, r_k] and [B, n_kv, L, r_v]):

    CK_cache[:, :, t] = C_k  -> K_all = RoPE_0..L-1(CK_cache U_k^T) ─┐
    CV_cache[:, :, t] = C_v  ───────────────────────────────────────┼─ SDPA(q, K_all, CV_cache) -> o_proj(W_o')

where V's up-projection is folded into o_proj: for query head i of kv group g,
``W_o'[:, i] = W_o[:, i] U_v,g`` ([E, r_v]) and ``b_o' = b_o + W_o b_v`` (attention
weights sum to one). A fake-quantised graph keeps what was evaluated: the cached latents are
the ones after their quantisers (C_k, C_v here are what U_k, U_v read), and when o_proj's input
is activation-quantised V is not folded: the per-head attention output is up-projected by U_v
(one block-diagonal linear, + b_v), quantised by the same quantiser and multiplied by the
quantised W_o, because fq(P V) cannot be written as fq(P C_v) times a folded weight, and a folded
Q(W_o) U_v would no longer be a quantised weight. K is rebuilt for every cached position with the model's own
RoPE tables (:mod:`wsvd_passes.algorithms.rope`). The result is exact up to rounding; the
attention sub-graph it leaves is what :mod:`lowering` replaces by the fused op.
Ranks are per head padded to the layer maximum (zero rows/columns, exact), and the cached width
per head further to a multiple of LATENT_ALIGN (zero columns of the cache and of U_k, W_o'): 16-byte
rows for int8, 32-byte for bf16, so the kernel's loads stay vectorised. Joint (QSVD) factors cache
their one shared latent, which every head reads.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule, Node

from ..algorithms.quantize import fake_quant_activation
from ..algorithms.rope import rope_parameters, rope_tables
from ..errors import WsvdError
from ..graph.factor_spec import factor_spec, head_blocks
from ..graph.graph_utils import (
    add_tensor_attr,
    copy_meta,
    get_attr_node,
    infer_val,
    is_call,
    remove_attr_if_unused,
    tensor_attr,
)
from ..graph.pipeline import GraphPass
from ..graph.sites import AttentionSite

aten = torch.ops.aten
ROPE_COS, ROPE_SIN = "wsvd_rope.cos", "wsvd_rope.sin"  # [L, D] tables for cache positions 0..L-1
ROPE_INV_FREQ, ROPE_SCALING = "wsvd_rope.inv_freq", "wsvd_rope.attention_scaling"  # what the fused op needs
LATENT_ALIGN = 16  # cached latent width per head is a multiple of this


def aligned(r: int) -> int:
    """The cached width of a latent of r values: r rounded up to a multiple of LATENT_ALIGN."""
    return -(-r // LATENT_ALIGN) * LATENT_ALIGN


def widen_heads(U: torch.Tensor, heads: int, width: int) -> torch.Tensor:
    """U [out, heads r] -> [out, heads width]: each head's r columns followed by width - r zero columns."""
    out, cols = U.shape
    return torch.nn.functional.pad(U.reshape(out, heads, cols // heads), (0, width - cols // heads)).reshape(out, -1)


@dataclasses.dataclass
class CacheBytes:
    dense: int  # bytes of the K and V caches replaced
    latent: int  # bytes of the latent caches

    @property
    def ratio(self) -> float:
        return self.latent / self.dense


class LatentKVCache(GraphPass):
    """Cache K/V latents instead of K and V (needs factored K/V and a decode graph)."""

    def __init__(self, config):
        self.inv_freq, self.attention_scaling = rope_parameters(config)
        self.bytes = CacheBytes(0, 0)

    def transform(self, gm: GraphModule, sites: list[AttentionSite]) -> bool:
        for site in sites:
            self._check(gm, site)
        length = sites[0].k_cache.max_len
        cos, sin = rope_tables(self.inv_freq, self.attention_scaling, length)
        cache = tensor_attr(gm, sites[0].k_cache.buffer)  # tables, caches and factors follow its device
        add_tensor_attr(gm, ROPE_COS, cos.to(cache.device, cache.dtype), parameter=False)
        add_tensor_attr(gm, ROPE_SIN, sin.to(cache.device, cache.dtype), parameter=False)
        add_tensor_attr(gm, ROPE_INV_FREQ, self.inv_freq.to(cache.device, torch.float32), parameter=False)
        add_tensor_attr(gm, ROPE_SCALING, torch.tensor(self.attention_scaling), parameter=False)
        for site in sites:
            self._rewrite(gm, site)
        gm.graph.eliminate_dead_code(is_impure_node=_still_needed)
        for site in sites:
            for target in (site.k_cache.buffer, site.v_cache.buffer, site.k_proj.up, site.v_proj.up,
                           site.o_proj.weight, site.o_proj.bias, site.v_proj.bias):
                if target is not None:
                    remove_attr_if_unused(gm, target)
        return True

    @staticmethod
    def _check(gm: GraphModule, site: AttentionSite) -> None:
        where = f"layer {site.layer}"
        if site.k_cache is None:
            raise WsvdError(f"{where}: no KV cache in this graph; the latent-KV rewrite needs the decode graph (capture_decode)")
        if site.latent_kv:
            raise WsvdError(f"{where}: the cache already holds latents")
        if not (site.k_proj.factored and site.v_proj.factored):
            raise WsvdError(f"{where}: K and V are not factored; run the factorisation pass first")
        if site.k_proj.bias is not None:
            raise WsvdError(f"{where}: k_proj has a bias; rebuilding biased keys from the latent is not supported yet")

    def _rewrite(self, gm: GraphModule, site: AttentionSite) -> None:
        graph = gm.graph
        B, n_kv, L, H = tensor_attr(gm, site.k_cache.buffer).shape
        n_q = site.n_heads
        owner = site.k_proj.down.rpartition(".")[0]
        device, dtype = tensor_attr(gm, site.k_cache.buffer).device, tensor_attr(gm, site.k_cache.buffer).dtype
        layout = _cache_layout(gm, site)
        for name, (_, heads, r) in layout.items():
            add_tensor_attr(gm, f"{owner}.{name}_latent_cache", torch.zeros(B, heads, L, aligned(r), dtype=dtype, device=device),
                            parameter=False)
            self.bytes.latent += B * heads * L * aligned(r) * dtype.itemsize
        self.bytes.dense += 2 * B * n_kv * L * H * dtype.itemsize
        k_name, v_name = ("qkv", "qkv") if "qkv" in layout else ("k", "v")
        _, v_heads, r_v = layout[v_name]
        _, k_heads, r_k = layout[k_name]
        U_k = tensor_attr(gm, site.k_proj.up).detach()
        add_tensor_attr(gm, f"{owner}.k_up_cached", widen_heads(U_k, k_heads, aligned(r_k)), parameter=True)
        o_input = site.o_proj.node.args[0]
        quantised_o = is_call(o_input, fake_quant_activation)
        W, b = (_value_up_projection if quantised_o else _folded_output)(gm, site, v_heads)
        out_name = "v_up_heads" if quantised_o else "o_folded"
        add_tensor_attr(gm, f"{owner}.{out_name}", widen_heads(W, n_q, aligned(r_v)).to(dtype), parameter=True)
        if b is not None:
            add_tensor_attr(gm, f"{owner}.{out_name}_bias", b.to(dtype), parameter=True)

        anchor = site.attention
        def call(op, *args, **kwargs):  # noqa: E306 - a node before the attention call, attributed to it
            with graph.inserting_before(anchor):
                return infer_val(gm, copy_meta(graph.call_function(op, args, kwargs), anchor))

        def write_latent(name: str, latent: Node, heads: int, r: int) -> Node:
            per_head = call(aten.view.default, latent, [B, 1, heads, r])
            if aligned(r) != r:
                per_head = call(aten.constant_pad_nd.default, per_head, [0, aligned(r) - r])
            cache = get_attr_node(gm, f"{owner}.{name}_latent_cache", anchor)
            return call(aten.index_copy_.default, cache, 2, site.k_cache.index, call(aten.transpose.int, per_head, 1, 2))

        def expand(x: Node, heads: int, width: int) -> Node:
            """[B, heads, L, width] -> [B, n_q, L, width] (GQA expansion, or broadcast of a shared latent)."""
            if heads == n_q:
                return x
            x = call(aten.expand.default, call(aten.unsqueeze.default, x, 2), [B, heads, n_q // heads, L, width])
            return call(aten.reshape.default, x, [B, n_q, L, width])

        written = {name: write_latent(name, latent, heads, r) for name, (latent, heads, r) in layout.items()}
        r_k, r_v = aligned(r_k), aligned(r_v)
        flat = call(aten.reshape.default, call(aten.transpose.int, written[k_name], 1, 2), [B, L, k_heads * r_k])
        up = get_attr_node(gm, f"{owner}.k_up_cached", anchor)
        keys = call(aten.transpose.int, call(aten.view.default, call(aten.linear.default, flat, up), [B, L, n_kv, H]), 1, 2)
        rotated = call(aten.cat.default, [call(aten.neg.default, call(aten.slice.Tensor, keys, 3, H // 2, H)),
                                          call(aten.slice.Tensor, keys, 3, 0, H // 2)], -1)
        keys = call(aten.add.Tensor, call(aten.mul.Tensor, keys, get_attr_node(gm, ROPE_COS, anchor)),
                    call(aten.mul.Tensor, rotated, get_attr_node(gm, ROPE_SIN, anchor)))
        kwargs = dict(anchor.kwargs, scale=site.scale)
        mask = anchor.args[3] if len(anchor.args) > 3 else anchor.kwargs.get("attn_mask")
        kwargs.pop("attn_mask", None)
        out = call(aten.scaled_dot_product_attention.default, site.q_rope.out, expand(keys, n_kv, H),
                   expand(written[v_name], v_heads, r_v), mask, **kwargs)
        out = call(aten.reshape.default, call(aten.transpose.int, out, 1, 2), [B, 1, n_q * r_v])
        out_args = (out, get_attr_node(gm, f"{owner}.{out_name}", anchor))
        if b is not None:
            out_args += (get_attr_node(gm, f"{owner}.{out_name}_bias", anchor),)
        out = call(aten.linear.default, *out_args)
        if quantised_o:  # the per-head attention output goes through the evaluated graph's quantiser into
            # o_proj's own node, which keeps its quantised W_o and the QuantSpec FakeQuantize recorded on it
            site.o_proj.node.replace_input_with(o_input, call(fake_quant_activation, out, *o_input.args[1:], **o_input.kwargs))
        else:
            site.o_proj.node.replace_all_uses_with(out)
        for old in (site.k_cache.node, site.v_cache.node):  # in-place writes into the dense caches
            old.meta["wsvd_dead"] = True


def _cache_layout(gm: GraphModule, site: AttentionSite) -> dict[str, tuple[Node, int, int]]:
    """Latent caches of one layer: name -> (cached node, cache heads, width per head), from the factor
    layout FactorizeQKV recorded (:mod:`wsvd_passes.graph.factor_spec`).

    The cached node is what the up-projection reads: the latent after its quantiser when the graph is
    fake-quantised, so the cache holds what the evaluated graph computes with. Per-head factors cache
    one latent per kv head; joint factors cache the one shared latent; per-projection factors cache
    the K and V latents whole (one "head" each, every kv head reads all of it).
    """
    specs = {p: factor_spec(proj.node) for p, proj in (("k", site.k_proj), ("v", site.v_proj))}
    if specs["k"].granularity == "joint":
        return {"qkv": (site.k_proj.node.args[0], 1, specs["k"].width)}
    return {p: (proj.node.args[0], specs[p].blocks, specs[p].width) for p, proj in (("k", site.k_proj), ("v", site.v_proj))}


def _still_needed(node: Node) -> bool:
    """Impure for dead-code elimination, except the replaced dense cache writes (attention
    is nondeterministic only through dropout, which decode does not use)."""
    return node.is_impure(impure_random=False) and not node.meta.get("wsvd_dead", False)


def _value_up_projection(gm: GraphModule, site: AttentionSite, v_heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """U [n_q H, n_q r_v] block-diagonal with query head i's block U_v,g(i), and the value bias seen by each
    query head: the per-head attention output in model space, where the evaluated graph quantises it."""
    H, rep, n_q = site.head_dim, site.gqa_ratio, site.n_heads
    U_v = head_blocks(tensor_attr(gm, site.v_proj.up).detach().double(), site.n_kv_heads, shared=v_heads == 1)
    blocks = [U_v[i // rep] for i in range(n_q)]
    bias = None
    if site.v_proj.bias is not None:
        bias = tensor_attr(gm, site.v_proj.bias).detach().double().view(-1, H).repeat_interleave(rep, dim=0).reshape(-1)
    return torch.block_diag(*blocks), bias


def _folded_output(gm: GraphModule, site: AttentionSite, v_heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W_o' [E, n_q r_v] = per query head W_o[:, i] U_v,g(i); b_o' = b_o + W_o b_v."""
    H, rep, n_q = site.head_dim, site.gqa_ratio, site.n_heads
    W_o = tensor_attr(gm, site.o_proj.weight).detach().double()
    U_v = head_blocks(tensor_attr(gm, site.v_proj.up).detach().double(), site.n_kv_heads, shared=v_heads == 1)
    blocks = [W_o[:, i * H : (i + 1) * H] @ U_v[i // rep] for i in range(n_q)]
    bias = tensor_attr(gm, site.o_proj.bias).detach().double() if site.o_proj.bias else None
    if site.v_proj.bias is not None:
        b_v = tensor_attr(gm, site.v_proj.bias).detach().double().view(-1, H)
        b_v_q = b_v.repeat_interleave(rep, dim=0).reshape(-1)  # value bias seen by each query head
        bias = (0 if bias is None else bias) + W_o @ b_v_q
    return torch.cat(blocks, dim=1), bias

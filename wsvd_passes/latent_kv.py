"""The latent-KV rewrite of a factored decode graph.

Before (per layer, one new token at cache index t, K/V caches [B, n_kv, L, H]):

    C_k = x D_k^T -> K = C_k U_k^T -> RoPE(t) -> K_cache[:, :, t] = K ─┐
    C_v = x D_v^T -> V = C_v U_v^T ---------> V_cache[:, :, t] = V ─┼─ SDPA(q, K_cache, V_cache) -> o_proj(W_o)

After (caches hold the pre-RoPE latents, [B, n_kv, L, r_k] and [B, n_kv, L, r_v]):

    CK_cache[:, :, t] = C_k  -> K_all = RoPE_0..L-1(CK_cache U_k^T) ─┐
    CV_cache[:, :, t] = C_v  ───────────────────────────────────────┼─ SDPA(q, K_all, CV_cache) -> o_proj(W_o')

where V's up-projection is folded into o_proj: for query head i of kv group g,
``W_o'[:, i] = W_o[:, i] U_v,g`` ([E, r_v]) and ``b_o' = b_o + W_o b_v`` (attention
weights sum to one). K is rebuilt for every cached position with the model's own
RoPE tables (:mod:`wsvd_passes.rope`). The result is exact up to rounding; the
attention sub-graph it leaves is what :mod:`lowering` replaces by the fused op.
Ranks are per head padded to the layer maximum (zero rows/columns, exact). Joint
(QSVD) factors cache their one shared latent, which every head reads.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule, Node

from .errors import WsvdError
from .factorize import per_head_ranks
from .graph_utils import add_tensor_attr, copy_meta, get_attr_node, infer_val, remove_attr_if_unused, tensor_attr
from .pipeline import GraphPass
from .rope import rope_parameters, rope_tables
from .sites import AttentionSite

aten = torch.ops.aten
ROPE_COS, ROPE_SIN = "wsvd_rope.cos", "wsvd_rope.sin"  # [L, D] tables for cache positions 0..L-1
ROPE_INV_FREQ, ROPE_SCALING = "wsvd_rope.inv_freq", "wsvd_rope.attention_scaling"  # what the fused op needs


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
            for target in (site.k_cache.buffer, site.v_cache.buffer, site.v_proj.up, site.o_proj.weight,
                           site.o_proj.bias, site.v_proj.bias):
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
            add_tensor_attr(gm, f"{owner}.{name}_latent_cache", torch.zeros(B, heads, L, r, dtype=dtype, device=device),
                            parameter=False)
            self.bytes.latent += B * heads * L * r * dtype.itemsize
        self.bytes.dense += 2 * B * n_kv * L * H * dtype.itemsize
        k_name, v_name = ("qkv", "qkv") if "qkv" in layout else ("k", "v")
        _, v_heads, r_v = layout[v_name]
        W_o, b_o = _folded_output(gm, site, v_heads, r_v)
        add_tensor_attr(gm, f"{owner}.o_folded", W_o.to(dtype), parameter=True)
        if b_o is not None:
            add_tensor_attr(gm, f"{owner}.o_folded_bias", b_o.to(dtype), parameter=True)

        anchor = site.attention
        def call(op, *args, **kwargs):  # noqa: E306 - a node before the attention call, attributed to it
            with graph.inserting_before(anchor):
                return infer_val(gm, copy_meta(graph.call_function(op, args, kwargs), anchor))

        def write_latent(name: str, latent: Node, heads: int, r: int) -> Node:
            per_head = call(aten.transpose.int, call(aten.view.default, latent, [B, 1, heads, r]), 1, 2)
            cache = get_attr_node(gm, f"{owner}.{name}_latent_cache", anchor)
            return call(aten.index_copy_.default, cache, 2, site.k_cache.index, per_head)

        def expand(x: Node, heads: int, width: int) -> Node:
            """[B, heads, L, width] -> [B, n_q, L, width] (GQA expansion, or broadcast of a shared latent)."""
            if heads == n_q:
                return x
            x = call(aten.expand.default, call(aten.unsqueeze.default, x, 2), [B, heads, n_q // heads, L, width])
            return call(aten.reshape.default, x, [B, n_q, L, width])

        written = {name: write_latent(name, latent, heads, r) for name, (latent, heads, r) in layout.items()}
        _, k_heads, r_k = layout[k_name]
        flat = call(aten.reshape.default, call(aten.transpose.int, written[k_name], 1, 2), [B, L, k_heads * r_k])
        up = get_attr_node(gm, site.k_proj.up, anchor)
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
        o_args = (out, get_attr_node(gm, f"{owner}.o_folded", anchor))
        if b_o is not None:
            o_args += (get_attr_node(gm, f"{owner}.o_folded_bias", anchor),)
        with graph.inserting_before(site.o_proj.node):
            new_o = copy_meta(graph.call_function(aten.linear.default, o_args), site.o_proj.node,
                              val=site.o_proj.node.meta.get("val"))
        site.o_proj.node.replace_all_uses_with(new_o)
        for old in (site.k_cache.node, site.v_cache.node):  # in-place writes into the dense caches
            old.meta["wsvd_dead"] = True


def _cache_layout(gm: GraphModule, site: AttentionSite) -> dict[str, tuple[Node, int, int]]:
    """Latent caches of one layer: name -> (latent node, cache heads, width per head).

    Per-head factors (block-diagonal up-projections) cache one latent per kv head; joint
    factors cache the one shared latent; per-projection factors cache the K and V latents
    whole (one "head" each, every kv head reads all of it).
    """
    n_kv = site.n_kv_heads
    widths = {p: tensor_attr(gm, proj.down).shape[0] for p, proj in (("k", site.k_proj), ("v", site.v_proj))}
    if site.k_proj.latent is site.v_proj.latent:
        return {"qkv": (site.k_proj.latent, 1, widths["k"])}
    per_head = all(per_head_ranks(gm, proj.up, n_kv) for proj in (site.k_proj, site.v_proj))
    heads = n_kv if per_head else 1
    return {p: (proj.latent, heads, widths[p] // heads) for p, proj in (("k", site.k_proj), ("v", site.v_proj))}


def _still_needed(node: Node) -> bool:
    """Impure for dead-code elimination, except the replaced dense cache writes (attention
    is nondeterministic only through dropout, which decode does not use)."""
    return node.is_impure(impure_random=False) and not node.meta.get("wsvd_dead", False)


def _folded_output(gm: GraphModule, site: AttentionSite, v_heads: int, r_v: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W_o' [E, n_q r_v] = per query head W_o[:, i] U_v,g(i); b_o' = b_o + W_o b_v.

    U_v,g is kv head g's rows of U_v, restricted to g's latent columns when the cache is per head."""
    H, rep, n_q = site.head_dim, site.gqa_ratio, site.n_heads
    W_o = tensor_attr(gm, site.o_proj.weight).detach().double()
    U_v = tensor_attr(gm, site.v_proj.up).detach().double()

    def u_v(g: int) -> torch.Tensor:
        rows = U_v[g * H : (g + 1) * H]
        return rows[:, g * r_v : (g + 1) * r_v] if v_heads > 1 else rows

    blocks = [W_o[:, i * H : (i + 1) * H] @ u_v(i // rep) for i in range(n_q)]
    bias = tensor_attr(gm, site.o_proj.bias).detach().double() if site.o_proj.bias else None
    if site.v_proj.bias is not None:
        b_v = tensor_attr(gm, site.v_proj.bias).detach().double().view(-1, H)
        b_v_q = b_v.repeat_interleave(rep, dim=0).reshape(-1)  # value bias seen by each query head
        bias = (0 if bias is None else bias) + W_o @ b_v_q
    return torch.cat(blocks, dim=1), bias

"""Lowering pass: attention over a latent KV cache -> one ``wsvd::latent_attention`` node.

Matched per attention site (as left by :class:`wsvd_passes.passes.latent_kv.LatentKVCache`):

    SDPA(q_rot, GQA(RoPE_tables(unflatten(linear(flatten(CK_cache), U_k)))), GQA(CV_cache), mask)

where RoPE uses the rewrite's tables for positions 0..L-1 and the mask admits the
cache indices up to the current one. It becomes

    latent_attention(q_rot[:, :, 0], CK_cache, B_K, CV_cache, index + 1, cos, sin, scale, a)[:, :, None]

with B_K [n_kv, r_k, D] the diagonal blocks of U_k, transposed (for a shared latent: each kv head's
rows of U_k, transposed, and the cache an expanded view for every kv head: head stride 0, no copy),
and cos/sin the float32 [L, D/2] tables of ``j * inv_freq`` (:func:`wsvd_passes.algorithms.rope.rope_half_tables`).
Everything the K rebuild computed becomes dead and is removed.

A latent that the graph fake-quantises to 8 bits or fewer before caching (``fake_quant_activation``,
per token, or per token per head) is cached as what that quantiser computes, in integer form: int8
codes [B, heads, L, r] and float32 scales [B, heads, L] (:func:`wsvd_passes.algorithms.quantize.quantize_activation`,
``codes * scale`` equal to the fake-quant value), and the op reads them through its int8 path.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

import lowering.ops  # noqa: F401  (registers torch.ops.wsvd.latent_attention)
from wsvd_passes.algorithms.quantize import fake_quant_activation, quantize_activation
from wsvd_passes.algorithms.rope import rope_half_tables
from wsvd_passes.errors import WsvdError
from wsvd_passes.graph.factor_spec import head_blocks
from wsvd_passes.graph.graph_utils import (
    add_tensor_attr,
    copy_meta,
    get_attr_node,
    infer_val,
    remove_attr_if_unused,
    tensor_attr,
)
from wsvd_passes.graph.pipeline import GraphPass
from wsvd_passes.graph.sites import AttentionSite
from wsvd_passes.passes.latent_kv import ROPE_COS, ROPE_INV_FREQ, ROPE_SCALING, ROPE_SIN

aten = torch.ops.aten
ROPE_HALF_TABLES = ("wsvd_rope.cos_half", "wsvd_rope.sin_half")  # the op's float32 [L, D/2] tables


class LowerLatentAttention(GraphPass):
    """Replace every latent-cache attention by the fused op."""

    def transform(self, gm: GraphModule, sites: list[AttentionSite]) -> bool:
        if not all(s.latent_kv for s in sites):
            raise WsvdError("the graph does not cache K/V latents: run LatentKVCache before lowering")
        length = tensor_attr(gm, sites[0].k_cache.buffer).shape[2]
        for name, table in zip(ROPE_HALF_TABLES, rope_half_tables(tensor_attr(gm, ROPE_INV_FREQ), length)):
            add_tensor_attr(gm, name, table, parameter=False)
        tables = [get_attr_node(gm, name, sites[0].attention) for name in ROPE_HALF_TABLES]
        scaling = float(tensor_attr(gm, ROPE_SCALING))
        for site in sites:
            self._lower(gm, site, tables, scaling)
        graph = gm.graph
        graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure(impure_random=False) and not n.meta.get(DEAD))
        for node in [n for n in graph.nodes if n.meta.get(DEAD)]:  # float caches replaced by int8 ones
            if not node.users:
                graph.erase_node(node)
        graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure(impure_random=False))
        for buffer in {w.buffer for site in sites for w in (site.k_cache, site.v_cache)}:
            remove_attr_if_unused(gm, buffer)
        return True

    @staticmethod
    def _lower(gm: GraphModule, site: AttentionSite, tables: list, scaling: float) -> None:
        where = f"layer {site.layer}"
        for node, name in ((site.k_rope.cos, ROPE_COS), (site.k_rope.sin, ROPE_SIN)):
            if not (node.op == "get_attr" and node.target == name):
                raise WsvdError(f"{where}: keys are not rotated with the cache-position RoPE tables; cannot lower")
        n_kv = site.n_kv_heads
        U_k = tensor_attr(gm, site.k_proj.up).detach()
        k_heads, r_k = tensor_attr(gm, site.k_cache.buffer).shape[1::2]
        v_heads = tensor_attr(gm, site.v_cache.buffer).shape[1]
        bk = head_blocks(U_k, n_kv, shared=k_heads == 1).transpose(1, 2).contiguous()  # B_K [n_kv, r_k, H]
        owner = site.k_proj.up.rpartition(".")[0]
        add_tensor_attr(gm, f"{owner}.k_up_heads", bk, parameter=True)
        attn = site.attention
        graph = gm.graph

        def call(op, *args):
            with graph.inserting_before(attn):
                return infer_val(gm, copy_meta(graph.call_function(op, args), attn))

        batch = int(site.q_rope.out.meta["val"].shape[0])
        lengths = call(aten.expand.default, call(aten.add.Tensor, site.k_cache.index, 1), [batch])
        q = call(aten.squeeze.dim, site.q_rope.out, 2)
        def per_kv_head(cache, heads):  # a shared latent is read by every kv head (a broadcast view)
            if cache is None or heads == n_kv:
                return cache
            shape = [int(d) for d in cache.meta["val"].shape]
            return call(aten.expand.default, cache, [shape[0], n_kv, *shape[2:]])

        caches = {}
        for write, heads in ((site.k_cache, k_heads), (site.v_cache, v_heads)):
            if write.node not in caches:  # a joint latent is one cache for K and V
                caches[write.node] = _int8_cache(gm, write, heads) or (write.node, None)
        (ck, ck_scale), (cv, cv_scale) = caches[site.k_cache.node], caches[site.v_cache.node]
        out = call(torch.ops.wsvd.latent_attention.default, q, per_kv_head(ck, k_heads),
                   get_attr_node(gm, f"{owner}.k_up_heads", attn), per_kv_head(cv, v_heads), lengths,
                   *tables, site.scale, scaling, per_kv_head(ck_scale, k_heads), per_kv_head(cv_scale, v_heads))
        dtype = attn.meta["val"].dtype
        if dtype != torch.float32:
            out = call(aten.to.dtype, out, dtype)
        attn.replace_all_uses_with(call(aten.unsqueeze.default, out, 2))


DEAD = "wsvd_replaced_cache"  # meta flag of a float cache write that an int8 one replaced
_LATENT_LAYOUT_OPS = (aten.view.default, aten.reshape.default, aten.transpose.int, aten.constant_pad_nd.default)


def _int8_cache(gm: GraphModule, write, heads: int) -> tuple[Node, Node] | None:
    """For a cache write of a latent fake-quantised to <= 8 bits: the writes of its int8 codes and float32
    scales into new caches [B, heads, L, r] and [B, heads, L] (the float cache's write is marked dead);
    (codes cache, scale cache) nodes. None when the cached latent is not so quantised."""
    source = write.node.args[3]
    while isinstance(source, Node) and source.op == "call_function" and source.target in _LATENT_LAYOUT_OPS:
        source = source.args[0]
    if not (isinstance(source, Node) and source.target is fake_quant_activation and source.args[1] <= 8):
        return None
    latent, bits, group = source.args[0], source.args[1], source.kwargs.get("group")
    B, _, L, width = tensor_attr(gm, write.buffer).shape
    device = tensor_attr(gm, write.buffer).device
    r = int(latent.meta["val"].shape[-1]) // heads
    owner, _, leaf = write.buffer.rpartition(".")
    add_tensor_attr(gm, f"{owner}.{leaf}_int8", torch.zeros(B, heads, L, width, dtype=torch.int8, device=device),
                    parameter=False)
    add_tensor_attr(gm, f"{owner}.{leaf}_scale", torch.zeros(B, heads, L, dtype=torch.float32, device=device),
                    parameter=False)
    graph = gm.graph

    def call(op, *args, **kwargs):
        with graph.inserting_before(write.node):
            return infer_val(gm, copy_meta(graph.call_function(op, args, kwargs), write.node))

    quantised = call(quantize_activation, latent, bits, group=group, clip=source.kwargs.get("clip"))
    codes = call(aten.view.default, call(operator.getitem, quantised, 0), [B, 1, heads, r])
    if width != r:
        codes = call(aten.constant_pad_nd.default, codes, [0, width - r])
    scales = call(aten.view.default, call(operator.getitem, quantised, 1), [B, 1, heads])
    written = tuple(call(aten.index_copy_.default, get_attr_node(gm, f"{owner}.{leaf}_{kind}", write.node), 2,
                         write.index, call(aten.transpose.int, value, 1, 2))
                    for kind, value in (("int8", codes), ("scale", scales)))
    write.node.meta[DEAD] = True
    return written

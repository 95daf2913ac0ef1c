"""Lowering pass: attention over a latent KV cache -> one ``wsvd::latent_attention`` node.

Matched per attention site (as left by :class:`wsvd_passes.latent_kv.LatentKVCache`):

    SDPA(q_rot, GQA(RoPE_tables(unflatten(linear(flatten(CK_cache), U_k)))), GQA(CV_cache), mask)

where RoPE uses the rewrite's tables for positions 0..L-1 and the mask admits the
cache indices up to the current one. It becomes

    latent_attention(q_rot[:, :, 0], CK_cache, B_K, CV_cache, index + 1, cos, sin, scale, a)[:, :, None]

with B_K [n_kv, r_k, D] the diagonal blocks of U_k, transposed (for a shared latent: each kv head's
rows of U_k, transposed, and the cache an expanded view for every kv head: head stride 0, no copy),
and cos/sin the float32 [L, D/2] tables of ``j * inv_freq`` (:func:`wsvd_passes.rope.rope_half_tables`).
Everything the K rebuild computed becomes dead and is removed.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

import lowering.ops  # noqa: F401  (registers torch.ops.wsvd.latent_attention)
from wsvd_passes.errors import WsvdError
from wsvd_passes.graph_utils import add_tensor_attr, copy_meta, get_attr_node, infer_val, tensor_attr
from wsvd_passes.latent_kv import ROPE_COS, ROPE_INV_FREQ, ROPE_SCALING, ROPE_SIN
from wsvd_passes.pipeline import GraphPass
from wsvd_passes.rope import rope_half_tables
from wsvd_passes.sites import AttentionSite

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
        gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure(impure_random=False))
        return True

    @staticmethod
    def _lower(gm: GraphModule, site: AttentionSite, tables: list, scaling: float) -> None:
        where = f"layer {site.layer}"
        for node, name in ((site.k_rope.cos, ROPE_COS), (site.k_rope.sin, ROPE_SIN)):
            if not (node.op == "get_attr" and node.target == name):
                raise WsvdError(f"{where}: keys are not rotated with the cache-position RoPE tables; cannot lower")
        n_kv, H = site.n_kv_heads, site.head_dim
        U_k = tensor_attr(gm, site.k_proj.up).detach()
        k_heads, r_k = tensor_attr(gm, site.k_cache.buffer).shape[1::2]
        v_heads = tensor_attr(gm, site.v_cache.buffer).shape[1]
        # B_K[h] = (kv head h's rows of U_k, restricted to h's latent columns when the cache is per head)^T
        cols = [slice(h * r_k, (h + 1) * r_k) if k_heads > 1 else slice(0, r_k) for h in range(n_kv)]
        bk = torch.stack([U_k[h * H : (h + 1) * H, cols[h]].T for h in range(n_kv)]).contiguous()
        owner = site.k_proj.up.rpartition(".")[0]
        add_tensor_attr(gm, f"{owner}.k_up_heads", bk, parameter=True)
        attn = site.attention
        graph = gm.graph

        def call(op, *args):
            with graph.inserting_before(attn):
                return infer_val(gm, copy_meta(graph.call_function(op, args), attn))

        batch = site.q_rope.out.meta["val"].shape[0]
        lengths = call(aten.expand.default, call(aten.add.Tensor, site.k_cache.index, 1), [batch])
        q = call(aten.squeeze.dim, site.q_rope.out, 2)
        def per_kv_head(cache, heads):  # a shared latent is read by every kv head (a broadcast view)
            if heads == n_kv:
                return cache
            shape = list(cache.meta["val"].shape)
            return call(aten.expand.default, cache, [shape[0], n_kv, *shape[2:]])

        out = call(torch.ops.wsvd.latent_attention.default, q, per_kv_head(site.k_cache.node, k_heads),
                   get_attr_node(gm, f"{owner}.k_up_heads", attn), per_kv_head(site.v_cache.node, v_heads), lengths,
                   *tables, site.scale, scaling)
        dtype = attn.meta["val"].dtype
        if dtype != torch.float32:
            out = call(aten.to.dtype, out, dtype)
        attn.replace_all_uses_with(call(aten.unsqueeze.default, out, 2))

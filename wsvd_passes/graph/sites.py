"""Attention sites: typed records of every attention layer, found from the graph alone.

A site is anchored on an ``aten.scaled_dot_product_attention`` node and found by
walking its operands, so any decoder whose exported graph has the Llama pattern
is supported without model-specific code:

    x ─┬─ linear(W_q) ─ view/transpose ─ RoPE ────────────────────────────┐
       ├─ linear(W_k) ─ view/transpose ─ RoPE ─ [cache write] ─ [GQA expand] ─ SDPA ─ reshape ─ linear(W_o)
       └─ linear(W_v) ─ view/transpose ──────── [cache write] ─ [GQA expand] ─┘

RoPE is the rotate-half form ``x * cos + cat(-x[..., d/2:], x[..., :d/2]) * sin``.
Shapes: q after RoPE is [B, n_heads, S, head_dim]; k, v before GQA expansion are
[B, n_kv_heads, S_kv, head_dim]. Records hold ``torch.fx.Node`` references into
the graph they were found in; re-run :func:`find_sites` after editing a graph.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule, Node

from ..algorithms.quantize import fake_quant_activation  # quantise-dequantise keeps shapes: walked through like a view
from ..errors import WsvdError
from .graph_utils import FIRST_LAYER, NO_LAYERS, is_call

aten = torch.ops.aten

# Ops that only re-shape or re-label a tensor: the walker passes through them.
_SHAPE_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.clone.default, aten.alias.default, aten.contiguous.default,
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
    aten.constant_pad_nd.default,  # zero columns the latent-KV rewrite appends to reach the aligned cache width
}
# Identity modules inserted by our own passes (calibration observers) are walked through too.
PASSTHROUGH_MODULE_PREFIX = "wsvd_observer_"
# in-place and functional writes of a static KV cache (also how generation finds the cache buffers)
CACHE_WRITES = {aten.index_copy_.default, aten.index_copy.default, aten.index_put_.default, aten.index_put.default}


@dataclasses.dataclass
class Projection:
    """A q/k/v/o projection, dense ``linear(x, W, b)`` or factored ``linear(linear(x, D), U, b)``.

    W is [out_features, in_features]. Factored: D is [rank, in_features] and the latent
    C = x D^T is [.., rank]; U is [out_features, rank] (block diagonal for per-head factors,
    and C is shared by q, k and v for joint factors). Targets are ``get_attr`` names.
    """

    node: Node  # the (outer) linear producing the projection output
    weight: str | None  # dense W; None when factored
    bias: str | None
    out_features: int
    in_features: int
    down: str | None = None
    up: str | None = None  # None for a latent V whose up-projection is folded into o_proj
    latent: Node | None = None
    latent_cache: CacheWrite | None = None  # set when the latent (not K/V) is what the cache stores

    @property
    def factored(self) -> bool:
        return self.down is not None


@dataclasses.dataclass
class Rope:
    """Rotate-half RoPE ``out = x * cos + rotate_half(x) * sin``; cos/sin are [.., S, head_dim]."""

    out: Node
    x: Node  # pre-RoPE input [B, heads, S, head_dim]
    cos: Node
    sin: Node


@dataclasses.dataclass
class CacheWrite:
    """In-place write of the new keys or values into a static cache buffer [B, n_kv, L_max, D]."""

    node: Node
    buffer: str  # get_attr target of the cache buffer
    index: Node  # positions written (cache_position)
    max_len: int


@dataclasses.dataclass
class AttentionSite:
    """Everything later passes need about one attention layer."""

    layer: int  # 0-based, in graph order
    module_path: str  # e.g. "model.layers.3.self_attn"
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    scale: float  # softmax scale used by the attention call
    qkv_input: Node  # the normalised hidden state q, k and v are computed from [B, S, hidden]
    q_proj: Projection
    k_proj: Projection
    v_proj: Projection
    o_proj: Projection
    q_rope: Rope
    k_rope: Rope
    k_cache: CacheWrite | None  # None in the full-sequence graph
    v_cache: CacheWrite | None
    k_expand: Node | None  # output of the GQA expansion of k (None when n_heads == n_kv_heads)
    v_expand: Node | None
    attention: Node  # the scaled_dot_product_attention call
    attn_mask: Node | None

    @property
    def gqa_ratio(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def latent_kv(self) -> bool:
        """True when the caches hold K/V latents (after the latent-KV rewrite)."""
        return self.k_proj.latent_cache is not None


def _val(node: Node):
    return node.meta.get("val")


def _shape(node: Node) -> tuple[int, ...]:
    val = _val(node)
    if not isinstance(val, torch.Tensor):
        raise WsvdError(f"node {node.name} has no tensor metadata: capture the model with wsvd_passes.graph.capture")
    return tuple(val.shape)


def module_path(node: Node) -> str:
    """The innermost module that produced ``node`` (from export's nn_module_stack), '' for the root."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def is_passthrough(node) -> bool:
    """Shape ops, fake quantisers and our observer modules: they keep what a value is, so analyses walk
    through them."""
    return is_call(node, *_SHAPE_OPS, fake_quant_activation) or (
        isinstance(node, Node) and node.op == "call_module" and node.target.startswith(PASSTHROUGH_MODULE_PREFIX)
    )


def skip_passthrough(node: Node) -> Node:
    """The first node above ``node`` (itself included) that is not :func:`is_passthrough`."""
    while is_passthrough(node):
        node = node.args[0]
    return node


def _projection_source(linear: Node) -> Node:
    """The tensor a projection reads, walking back through shape ops and the linear
    factors of an already factored projection (x -> down -> up)."""
    node = linear.args[0]
    while True:
        if is_passthrough(node) or is_call(node, aten.linear.default):
            node = node.args[0]
        elif is_call(node, *CACHE_WRITES):
            node = _written_value(node)
        else:
            return node


def _attr(gm: GraphModule, node: Node, what: str) -> str:
    if not (isinstance(node, Node) and node.op == "get_attr"):
        raise WsvdError(f"the {what} is computed, not a stored tensor (node {getattr(node, 'name', node)})")
    return node.target


def _linear(gm: GraphModule, node: Node, what: str, where: str) -> Projection:
    node = skip_passthrough(node)
    if not is_call(node, aten.linear.default):
        raise WsvdError(f"{where}: the {what} does not come from a linear projection (found {_describe(node)})")
    weight = _attr(gm, node.args[1], f"{what} weight")
    bias = _attr(gm, node.args[2], f"{what} bias") if len(node.args) > 2 and node.args[2] is not None else None
    out_f, rank = _shape(node.args[1])
    inner, latent_cache = _cache_write(gm, node.args[0])  # latent KV cache: x -> D -> cache -> U
    inner = skip_passthrough(inner)
    if is_call(inner, aten.linear.default) and len(inner.args) == 2:  # factored: x -> D -> U
        down = _attr(gm, inner.args[1], f"{what} down-projection")
        return Projection(node, None, bias, out_f, _shape(inner.args[1])[1], down=down, up=weight, latent=inner,
                          latent_cache=latent_cache)
    if latent_cache is not None:
        raise WsvdError(f"{where}: the cached {what} latent is not produced by a down-projection")
    return Projection(node, weight, bias, out_f, rank)


def _describe(node) -> str:
    if not isinstance(node, Node):
        return repr(node)
    return f"{node.target}" if node.op == "call_function" else f"{node.op} {node.target}"


def _rotate_half_source(cat: Node) -> Node | None:
    """If ``cat`` is cat([-x[..., d/2:], x[..., :d/2]], -1) return x, else None."""
    if not is_call(cat, aten.cat.default) or len(cat.args[0]) != 2:
        return None
    neg, lower = cat.args[0]
    if not (is_call(neg, aten.neg.default) and is_call(neg.args[0], aten.slice.Tensor) and is_call(lower, aten.slice.Tensor)):
        return None
    upper = neg.args[0]
    x = lower.args[0]
    if upper.args[0] is not x:
        return None
    d = _shape(x)[-1]
    rank = len(_shape(x))
    dims = {a % rank for a in (upper.args[1], lower.args[1], cat.args[1] if len(cat.args) > 1 else 0)}
    if dims != {rank - 1} or lower.args[2] != 0 or lower.args[3] != d // 2 or upper.args[2] != d // 2:
        return None
    return x


def _rope(node: Node, where: str, what: str) -> Rope:
    """Match ``x * cos + rotate_half(x) * sin`` (either operand order) ending at ``node``."""
    node = skip_passthrough(node)
    if is_call(node, aten.add.Tensor) and all(is_call(a, aten.mul.Tensor) for a in node.args[:2]):
        for m_rot, m_x in (node.args[:2], reversed(node.args[:2])):
            for cat, sin in (m_rot.args, reversed(m_rot.args)):
                x = _rotate_half_source(cat) if isinstance(cat, Node) else None
                if x is not None and x in m_x.args:
                    cos = m_x.args[1] if m_x.args[0] is x else m_x.args[0]
                    return Rope(node, x, cos, sin)
    raise WsvdError(
        f"{where}: no rotate-half rotary embedding (RoPE) on the {what} path (found {_describe(node)}); "
        "wsvd supports RoPE decoders of the Llama family (Llama, Mistral, Qwen2)"
    )


def _strip_gqa(node: Node) -> tuple[Node, Node | None]:
    """Undo repeat_kv's unsqueeze(2) -> expand -> reshape; returns (kv source, expansion output)."""
    while is_call(node, aten.clone.default, aten.contiguous.default, aten.alias.default):
        node = node.args[0]
    if is_call(node, aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        expand = node.args[0]
        if is_call(expand, aten.expand.default) and is_call(expand.args[0], aten.unsqueeze.default):
            return expand.args[0].args[0], node
    return node, None


def _cache_write(gm: GraphModule, node: Node) -> tuple[Node, CacheWrite | None]:
    """If ``node`` is a write into a cache buffer, return (value written, record)."""
    node = skip_passthrough(node)
    if not is_call(node, *CACHE_WRITES):
        return node, None
    buffer = _attr(gm, node.args[0], "KV cache")
    if node.target in (aten.index_copy_.default, aten.index_copy.default):
        index = node.args[2]
    else:  # index_put_(cache, (None, None, positions), value)
        indices = [i for i in node.args[1] if i is not None]
        if len(indices) != 1:
            raise WsvdError(f"cache write {node.name} indexes more than the sequence dim: unsupported cache layout")
        index = indices[0]
    return _written_value(node), CacheWrite(node, buffer, index, _shape(node.args[0])[2])


def _written_value(write: Node) -> Node:
    """The tensor a cache write stores (index_copy_(cache, dim, index, value) / index_put_(cache, idx, value))."""
    return write.args[3] if write.target in (aten.index_copy_.default, aten.index_copy.default) else write.args[2]


def _output_projection(gm: GraphModule, attn: Node, where: str) -> Projection:
    node = attn
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise WsvdError(f"{where}: the attention output feeds {len(users)} nodes, expected one output projection")
        node = users[0]
        if is_call(node, aten.linear.default) and node.args[0] is not None:
            return _linear(gm, node, "output", where)
        if not is_passthrough(node):
            raise WsvdError(f"{where}: the attention output reaches {_describe(node)} before any output projection")


def _site(gm: GraphModule, layer: int, attn: Node) -> AttentionSite:
    path = module_path(attn)
    where = f"layer {layer} ({path or 'root'})"
    q_arg, k_arg, v_arg = attn.args[:3]
    mask = attn.args[3] if len(attn.args) > 3 else attn.kwargs.get("attn_mask")

    q_rope = _rope(q_arg, where, "query")
    q = _linear(gm, q_rope.x, "query", where)

    k_src, k_expand = _strip_gqa(k_arg)
    v_src, v_expand = _strip_gqa(v_arg)
    k_written, k_cache = _cache_write(gm, k_src)
    v_written, v_cache = _cache_write(gm, v_src)
    k_rope = _rope(k_written, where, "key")
    k = _linear(gm, k_rope.x, "key", where)
    v = _linear(gm, v_written, "value", where)
    o = _output_projection(gm, attn, where)
    head_dim = _shape(q_rope.out)[-1]
    if k.latent_cache is not None:  # latent KV cache: the caches hold K and V latents
        k_cache = k.latent_cache
        if v_cache is None:
            raise WsvdError(f"{where}: the K latent is cached but V is not: unsupported cache layout")
    if v_cache is not None and k.latent_cache is not None:  # V latent attended directly, up-projection folded
        v = Projection(v.node, None, None, v.out_features, v.in_features, down=v.weight, latent=v.node,
                       latent_cache=v_cache)

    qkv_input = _projection_source(q.node)
    if not (qkv_input is _projection_source(k.node) is _projection_source(v.node)):
        raise WsvdError(f"{where}: q, k and v projections do not share one input; wsvd needs a standard self-attention")
    n_heads = _shape(q_rope.out)[1]
    n_kv_heads = _shape(k_rope.out)[1]
    hidden = _shape(qkv_input)[-1]
    v_width = _shape(v_arg)[-1]  # head_dim, or the latent width when V stays latent
    v_heads = _shape(v_cache.node)[1] if v.up is None and v_cache is not None else n_kv_heads
    checks = [
        (q.out_features == n_heads * head_dim, f"q_proj has {q.out_features} outputs, not n_heads*head_dim = {n_heads * head_dim}"),
        (k.out_features == n_kv_heads * head_dim, "k_proj outputs differ from n_kv_heads*head_dim"),
        (v.out_features == v_heads * v_width if v.up is not None or v_cache is None else  # a cached latent may be
         v.out_features % v_heads == 0 and v.out_features <= v_heads * v_width,  # padded to an aligned width
         "v_proj outputs differ from its heads times the value width"),
        (n_heads % n_kv_heads == 0, f"{n_heads} query heads are not a multiple of {n_kv_heads} kv heads"),
        (o.in_features == n_heads * v_width, "o_proj input size differs from n_heads * value width"),
        ((k_expand is None) == (n_heads == n_kv_heads), "GQA expansion does not match the head counts"),
        ((k_cache is None) == (v_cache is None), "only one of k and v is written to a cache"),
    ]
    for ok, problem in checks:
        if not ok:
            raise WsvdError(f"{where}: {problem}")
    scale = attn.kwargs.get("scale")
    return AttentionSite(
        layer=layer, module_path=path, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
        hidden_size=hidden, scale=float(scale) if scale is not None else head_dim ** -0.5,
        qkv_input=qkv_input, q_proj=q, k_proj=k, v_proj=v, o_proj=o, q_rope=q_rope, k_rope=k_rope,
        k_cache=k_cache, v_cache=v_cache, k_expand=k_expand, v_expand=v_expand, attention=attn,
        attn_mask=mask if isinstance(mask, Node) else None,
    )


def find_sites(gm: GraphModule) -> list[AttentionSite]:
    """Find every attention layer of a captured decoder; raise WsvdError naming what is missing."""
    attns = [n for n in gm.graph.nodes if is_call(n, aten.scaled_dot_product_attention.default)]
    if not attns and gm.meta.get(NO_LAYERS, False):
        return []
    if not attns:
        raise WsvdError(
            "no attention found: the graph has no aten.scaled_dot_product_attention call; "
            "load the model with attn_implementation='sdpa' (eager attention is not matched)"
        )
    first = gm.meta.get(FIRST_LAYER, 0)
    return [_site(gm, first + i, a) for i, a in enumerate(attns)]

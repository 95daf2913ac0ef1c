"""The residual stream of a pre-norm decoder, found from the graph: embeddings, RMSNorms,
the linears that read normalised states and the linears that write back into the stream.

    h_0 = E[ids];   for each block: h <- h + W_out( f( RMSNorm(h; gamma) W_in^T ) )^T;   logits = RMSNorm(h) W_lm^T

RMSNorm is ``gamma * (x * rsqrt(mean(x^2) + eps))``. Rotation passes need this map:
an orthogonal Q on the stream (h -> h Q) is exact when every reader is fed by an
RMSNorm (which commutes with Q once gamma is fused into the readers) and every
writer is a linear whose output side can absorb Q.

Graphs fed embeddings (the language decoder of a VLM, ``inputs_embeds`` in) have no
embedding table: the stream starts at that input, or at its rotation ``x S1`` once
:class:`~wsvd_passes.passes.rotate.RotateResidual` has inserted one (buffer ``INPUT_ROTATION``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule, Node

from ..errors import WsvdError
from .graph_utils import RESIDUAL_INPUT, is_call
from .sites import is_passthrough, skip_passthrough

aten = torch.ops.aten
INPUT_ROTATION = "wsvd_input_rotation"  # S1^T [E, E]: inputs_embeds -> inputs_embeds S1
_CASTS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.alias.default, aten.clone.default)


@dataclasses.dataclass
class Norm:
    out: Node  # gamma * normalised, or normalised when gamma is already fused away
    normalised: Node  # (a cast of) x * rsqrt(mean(x^2) + eps)
    scaled: Node  # x * rsqrt(...)
    gamma: str | None  # get_attr target [E]
    readers: list[Node]  # linear nodes reading the norm output


@dataclasses.dataclass
class ResidualStream:
    embedding: Node  # aten.embedding(E, ids), or the inputs_embeds input (or its rotation)
    norms: list[Norm]
    writers: list[Node]  # linear nodes whose output is added to the stream


def _users(node: Node) -> list[Node]:
    """Users that compute something (not export's dtype assertions or shape queries)."""
    return [u for u in node.users if not is_call(u, aten._assert_tensor_metadata.default, aten.sym_size.int)]


def _rms_norm(node: Node) -> Norm | None:
    """Match ``x * rsqrt(..)`` [-> casts] [-> gamma * .] starting at the scaling node."""
    if not (is_call(node, aten.mul.Tensor) and any(is_call(a, aten.rsqrt.default) for a in node.args[:2])):
        return None
    y = node
    while len(_users(y)) == 1 and is_call(_users(y)[0], *_CASTS):
        y = _users(y)[0]
    if len(_users(y)) == 1:
        user = _users(y)[0]
        if is_call(user, aten.mul.Tensor):
            g = user.args[0] if user.args[1] is y else user.args[1]
            if isinstance(g, Node) and g.op == "get_attr" and len(g.meta["val"].shape) == 1:
                return Norm(user, y, node, g.target, [])
    return Norm(y, y, node, None, [])


def _linear_readers(out: Node) -> list[Node]:
    """Linear nodes consuming ``out`` (through shape ops and observers); None if anything else does."""
    readers, frontier = [], [out]
    while frontier:
        node = frontier.pop()
        for user in _users(node):
            if is_call(user, aten.linear.default) and user.args[0] is node:
                readers.append(user)
            elif is_passthrough(user):
                frontier.append(user)
            else:
                raise WsvdError(f"a normalised state feeds {user.target} ({user.name}), not a linear layer: "
                                "rotation needs every RMSNorm output to feed linear layers only")
    return readers


def find_residual_stream(gm: GraphModule) -> ResidualStream:
    """Map the residual stream; raise WsvdError when the graph is not a pre-RMSNorm decoder."""
    source = _stream_source(gm)
    norms = {}
    for node in gm.graph.nodes:
        norm = _rms_norm(node)
        if norm is not None:
            norm.readers = _linear_readers(norm.out)
            norms[node] = norm
    stream, writers = {source}, []
    for node in gm.graph.nodes:
        if node in stream:
            continue
        if is_call(node, *_CASTS) and node.args[0] in stream:
            stream.add(node)
        elif is_call(node, aten.add.Tensor) and any(a in stream for a in node.args[:2]):
            branch = skip_passthrough(next(a for a in node.args[:2] if a not in stream))
            if not is_call(branch, aten.linear.default):
                raise WsvdError(f"a residual add ({node.name}) adds {branch.target}, not a linear output: "
                                "rotation needs linear writers into the residual stream")
            stream.add(node)
            writers.append(branch)
    norm_ops = {n.scaled for n in norms.values()}
    for node in stream:
        for user in _users(node):
            squared = is_call(user, aten.pow.Tensor_Scalar) and user.args[1] == 2
            if user not in stream and user not in norm_ops and not squared and user.op != "output":
                raise WsvdError(f"the residual stream feeds {user.target} ({user.name}) outside an RMSNorm: "
                                "rotation needs a pre-RMSNorm decoder (Llama family)")
    used = [n for n in norms.values() if n.readers]
    return ResidualStream(source, used, writers)


def _stream_source(gm: GraphModule) -> Node:
    """The token embedding, the inputs_embeds input (through its rotation, when inserted), or the input of a graph
    that is fed the residual stream (``RESIDUAL_INPUT``: a streamed layer)."""
    if gm.meta.get(RESIDUAL_INPUT, False):
        return next(n for n in gm.graph.nodes if n.op == "placeholder")
    embeddings = [n for n in gm.graph.nodes if is_call(n, aten.embedding.default)]
    if embeddings:
        if len(embeddings) != 1:
            raise WsvdError(f"found {len(embeddings)} token embeddings; rotation needs exactly one (input_ids models)")
        return embeddings[0]
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "inputs_embeds"]
    if not inputs:
        raise WsvdError("the graph has neither a token embedding nor an inputs_embeds input: rotation needs one")
    rotated = [u for u in inputs[0].users if is_call(u, aten.linear.default) and u.args[1].op == "get_attr"
               and u.args[1].target == INPUT_ROTATION]
    return rotated[0] if rotated else inputs[0]

"""Rotation passes (QuaRot / WSVD S1): exact orthogonal changes of basis that spread outliers.

- :class:`RotateResidual`: fuse every RMSNorm gamma into the linears reading it, then rotate
  the residual stream by a seeded random-sign Hadamard S1 [E, E] (h -> h S1):
  embeddings ``E' = E S1``; readers ``W' = W diag(gamma) S1``; writers ``W' = S1^T W``,
  ``b' = b S1``. RMSNorm without gamma commutes with S1, so the function is unchanged.
  A tied LM head (``graph_utils.TIED_HEAD`` in ``gm.meta``: it reads the embedding table E) stays tied: instead of
  ``E diag(gamma) S1`` it reads ``E S1`` (the rotated table, stored once) after a fixed linear
  ``x -> x G`` with ``G = S1^T diag(gamma) S1`` [E, E] (buffer ``<head>.tied_gamma``), since
  ``(x G)(E S1)^T = x S1^T diag(gamma) E^T``: one E x E matmul per token instead of a second
  V x E table.
- :class:`RotateValueHeads`: per-head Hadamard H [D, D] on V's output side, matched in
  o_proj: ``W_v,h' = H^T W_v,h`` (or ``U_v,h' = H^T U_v,h`` for factored V), ``b_v,h' = b_v,h H``,
  ``W_o[:, i]' = W_o[:, i] H``.
- :class:`OnlineHadamard`: where fusion is impossible (the input of the MLP's down_proj, after
  the nonlinearity) insert ``x -> x H`` as a linear with a Hadamard buffer and set ``W' = W H``.

All new tensors are computed in float64 from the current ones and replace them (weights are
never written in place: captures share storage with the eager model).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule, Node

from ..algorithms.hadamard import FACTOR_NAMES, HadamardFactors, hadamard_factors, hadamard_rotate, random_hadamard
from ..errors import WsvdError
from ..graph.graph_utils import (
    RESIDUAL_INPUT,
    TIED_HEAD,
    add_tensor_attr,
    copy_meta,
    get_attr_node,
    infer_val,
    is_call,
    logits_linears,
    remove_attr_if_unused,
    tensor_attr,
)
from ..graph.pipeline import GraphPass
from ..graph.residual import INPUT_ROTATION, find_residual_stream
from ..graph.sites import AttentionSite

aten = torch.ops.aten
S1_SEED = 0  # the residual rotation of rotation_passes(): S1 = random_hadamard(E, S1_SEED)
V_SEED = 1  # RotateValueHeads: layer i's R = random_hadamard(D, V_SEED + i)
TIED_GAMMA = "tied_gamma"  # <LM head owner>.tied_gamma: S1^T diag(gamma) S1 in front of a tied LM head


ONLINE_HADAMARD = "online_hadamard"  # OnlineHadamard's buffers: <owner>.online_hadamard_<part>


def fixed_rotation(target: str) -> bool:
    """The fixed rotations the rotation passes insert (not weights of the model; never quantised)."""
    return (target.endswith(TIED_GAMMA) or target == INPUT_ROTATION
            or target.rpartition(".")[2].startswith(ONLINE_HADAMARD))


def replace_tensor_arg(gm: GraphModule, user: Node, index: int, value: torch.Tensor, suffix: str) -> None:
    """Give ``user`` a new parameter in place of its ``index``-th (get_attr) argument."""
    old = user.args[index]
    if not (isinstance(old, Node) and old.op == "get_attr"):
        raise WsvdError(f"{user.name}: argument {index} is not a stored tensor")
    current = tensor_attr(gm, old.target)
    target = f"{old.target}_{suffix}"
    n = 1
    while _exists(gm, target):
        n += 1
        target = f"{old.target}_{suffix}{n}"
    add_tensor_attr(gm, target, value.to(current.device, current.dtype).contiguous(),
                    parameter=isinstance(current, torch.nn.Parameter))
    user.replace_input_with(old, get_attr_node(gm, target, user))
    remove_attr_if_unused(gm, old.target)


def _exists(gm: GraphModule, target: str) -> bool:
    try:
        tensor_attr(gm, target)
        return True
    except AttributeError:
        return False


def _weight(gm: GraphModule, node: Node, index: int = 1) -> torch.Tensor:
    return tensor_attr(gm, node.args[index].target).detach().double()


def rotated_rows(weight: torch.Tensor, S1: torch.Tensor, gamma: torch.Tensor | None = None,
                 rows: int = 4096) -> torch.Tensor:
    """(W diag(gamma)) S1 for W [n, E], in float64 ``rows`` rows at a time and returned in W's dtype: a [V, E]
    embedding table or LM head never has a whole float64 copy (8 V E bytes, and as many for the product) alive,
    only one block's. Row i is computed as in the whole product (tested)."""
    weight = weight.detach()
    out = torch.empty(weight.shape[0], S1.shape[1], dtype=weight.dtype, device=weight.device)
    for i in range(0, weight.shape[0], rows):
        block = weight[i:i + rows].double()
        out[i:i + rows] = (block if gamma is None else block * gamma[None, :]) @ S1
    return out


class RotateResidual(GraphPass):
    """Fuse RMSNorm gammas and rotate the residual stream by a random Hadamard S1."""

    def __init__(self, seed: int = S1_SEED):
        self.seed = seed

    def transform(self, gm: GraphModule, sites: list[AttentionSite]) -> bool:
        stream = find_residual_stream(gm)
        E = stream.embedding.meta["val"].shape[-1]
        S1 = random_hadamard(E, self.seed).to(stream.embedding.meta["val"].device)
        tied_heads = set()
        if is_call(stream.embedding, aten.embedding.default):
            tied_heads = set(logits_linears(gm)) if gm.meta.get(TIED_HEAD, False) else set()
            replace_tensor_arg(gm, stream.embedding, 0, rotated_rows(tensor_attr(gm, stream.embedding.args[0].target), S1), "rot")
        elif not gm.meta.get(RESIDUAL_INPUT, False):  # a streamed layer's input arrives rotated
            _rotate_input(gm, stream.embedding, S1)
        for norm in stream.norms:
            gamma = (tensor_attr(gm, norm.gamma).detach().double() if norm.gamma
                     else torch.ones(E, dtype=torch.float64, device=S1.device))
            for reader in norm.readers:
                if reader in tied_heads:  # the rotated table itself: one tensor, no float64 copies of E [V, E]
                    _keep_tied(gm, reader, tensor_attr(gm, stream.embedding.args[0].target), S1.T @ torch.diag(gamma) @ S1)
                else:
                    replace_tensor_arg(gm, reader, 1, rotated_rows(tensor_attr(gm, reader.args[1].target), S1, gamma), "rot")
            if norm.gamma:
                norm.out.replace_all_uses_with(norm.normalised)
                gm.graph.erase_node(norm.out)
                remove_attr_if_unused(gm, norm.gamma)
        for writer in stream.writers:
            replace_tensor_arg(gm, writer, 1, S1.T @ _weight(gm, writer), "rot")
            if len(writer.args) > 2 and writer.args[2] is not None:
                replace_tensor_arg(gm, writer, 2, _weight(gm, writer, 2) @ S1, "rot")
        return True


def _keep_tied(gm: GraphModule, head: Node, table: torch.Tensor, G: torch.Tensor) -> None:
    """``head(x)`` -> ``head'(x G)`` with head' reading the rotated embedding table (equal values, stored once)."""
    replace_tensor_arg(gm, head, 1, table, "rot")
    target = f"{head.args[1].target.rpartition('.')[0]}.{TIED_GAMMA}"
    weight = tensor_attr(gm, head.args[1].target)
    add_tensor_attr(gm, target, G.to(weight.device, weight.dtype).contiguous(), parameter=False)  # symmetric: G^T = G
    x = head.args[0]
    with gm.graph.inserting_before(head):
        mixed = infer_val(gm, copy_meta(gm.graph.call_function(
            aten.linear.default, (x, get_attr_node(gm, target, head))), head))
    head.replace_input_with(x, mixed)


def _rotate_input(gm: GraphModule, x: Node, S1: torch.Tensor) -> None:
    """Embeddings fed to the graph (VLM decoders) are rotated on entry: ``x -> x S1`` (a linear with S1^T)."""
    if x.op != "placeholder":
        raise WsvdError("the graph input is already rotated: run RotateResidual once")
    add_tensor_attr(gm, INPUT_ROTATION, S1.T.to(x.meta["val"].device, x.meta["val"].dtype).contiguous(), parameter=False)
    after_inputs = [n for n in gm.graph.nodes if n.op == "placeholder"][-1].next
    with gm.graph.inserting_before(after_inputs):
        weight = gm.graph.get_attr(INPUT_ROTATION)
        weight.meta["val"] = torch.empty_like(tensor_attr(gm, INPUT_ROTATION), device="meta")
        rotated = infer_val(gm, gm.graph.call_function(aten.linear.default, (x, weight)))
    x.replace_all_uses_with(rotated, delete_user_cb=lambda user: user is not rotated and not is_call(user, aten.sym_size.int))


class RotateValueHeads(GraphPass):
    """Per-head Hadamard on V's output side, undone inside o_proj."""

    def __init__(self, seed: int = V_SEED):
        self.seed = seed

    def rotation(self, site: AttentionSite) -> torch.Tensor:
        """R [D, D] (float64) of ``site``'s value heads."""
        return random_hadamard(site.head_dim, self.seed + site.layer)

    def transform(self, gm: GraphModule, sites: list[AttentionSite]) -> bool:
        for site in sites:
            if site.latent_kv:
                raise WsvdError(f"layer {site.layer}: rotate V before the latent-KV rewrite")
            D = site.head_dim
            v = site.v_proj.node  # dense W_v [n_kv D, E] or factored U_v [n_kv D, r]: rotate each head's rows
            W = _weight(gm, v)
            R = self.rotation(site).to(W.device)
            replace_tensor_arg(gm, v, 1, torch.cat([R.T @ block for block in W.split(D)]), "vrot")
            if len(v.args) > 2 and v.args[2] is not None:
                b = _weight(gm, v, 2)
                replace_tensor_arg(gm, v, 2, torch.cat([block @ R for block in b.split(D)]), "vrot")
            o = site.o_proj.node
            W_o = _weight(gm, o)
            replace_tensor_arg(gm, o, 1, torch.cat([block @ R for block in W_o.split(D, dim=1)], dim=1), "vrot")
        return True


class OnlineHadamard(GraphPass):
    """``x -> x H`` before every residual writer that is not an attention output (the MLP down_proj), W -> W H.

    One :func:`~wsvd_passes.algorithms.hadamard.hadamard_rotate` node per writer, reading the factors of H as
    buffers ``<owner>.online_hadamard_<factor>`` (:data:`~wsvd_passes.algorithms.hadamard.FACTOR_NAMES`), one tensor
    per size shared by every layer: n (K + M1 + M2) multiply-adds per token instead of the n^2 of a dense H
    (Llama-2-7B's n = 11008: 58x fewer, and 0.16 MB of float32 factors instead of 242 MB of bf16 per layer)."""

    def __init__(self, seed: int = 2):
        self.seed = seed

    def transform(self, gm: GraphModule, sites: list[AttentionSite]) -> bool:
        attention_outputs = {s.o_proj.node for s in sites}
        factors: dict[int, HadamardFactors] = {}  # built once per size, not once per layer
        shared: dict[tuple, tuple[torch.Tensor, ...]] = {}  # every layer's buffers are the same tensors
        for writer in find_residual_stream(gm).writers:
            if writer in attention_outputs:
                continue
            W = _weight(gm, writer)
            n = W.shape[1]
            if n not in factors:
                factors[n] = hadamard_factors(n, self.seed)
            owner = writer.args[1].target.rpartition(".")[0]
            dtype = tensor_attr(gm, writer.args[1].target).dtype
            if (n, W.device, dtype) not in shared:
                shared[(n, W.device, dtype)] = tuple(t.to(W.device, dtype) for t in factors[n].tensors())
            for part, tensor in zip(FACTOR_NAMES, shared[(n, W.device, dtype)]):
                add_tensor_attr(gm, f"{owner}.{ONLINE_HADAMARD}_{part}", tensor, parameter=False)
            x = writer.args[0]
            with gm.graph.inserting_before(writer):
                parts = tuple(get_attr_node(gm, f"{owner}.{ONLINE_HADAMARD}_{part}", writer)
                              for part in FACTOR_NAMES)
                rotated = infer_val(gm, copy_meta(gm.graph.call_function(hadamard_rotate, (x, *parts)), writer))
            writer.replace_input_with(x, rotated)
            rotated_weight = hadamard_rotate(W, *(t.to(W.device) for t in factors[n].tensors()))
            replace_tensor_arg(gm, writer, 1, rotated_weight, "had")
        return True


def rotation_passes() -> list[GraphPass]:
    """The QuaRot / WSVD-S1 rotations in order, with their default seeds (every recipe uses these)."""
    return [RotateResidual(), RotateValueHeads(), OnlineHadamard()]


@dataclasses.dataclass
class QKVBasis:
    """Where :func:`rotation_passes` take one dense site's q/k/v weights W_p [out, E], without rotating a graph::

        W'_p = L_p W_p diag(gamma) S1          g'_p = dLoss/dW'_p = L_p g_p diag(1/gamma) S1

    gamma [E] is the RMSNorm gain fused into them, S1 [E, E] the residual rotation, L_q = L_k = I and L_v the
    block-diagonal of R^T over kv heads (R [D, D] of :class:`RotateValueHeads`). The rotated model computes the
    same function, so its per-sample gradients follow from the dense ones g_p = dLoss/dW_p: with
    W_p = L_p^T W'_p (diag(gamma) S1)^-1 the chain rule gives g'_p = L_p g_p (diag(gamma) S1)^-T, and S1 is
    orthogonal. Both maps compute in the dtype and on the device of their input."""

    gamma: torch.Tensor  # float64 [E]
    S1: torch.Tensor  # float64 [E, E]
    R: torch.Tensor  # float64 [D, D]

    def weight(self, proj: str, W: torch.Tensor) -> torch.Tensor:
        return self._map(proj, W, self.gamma)

    def gradient(self, proj: str, g: torch.Tensor) -> torch.Tensor:
        return self._map(proj, g, 1.0 / self.gamma)

    def _map(self, proj: str, M: torch.Tensor, column_scale: torch.Tensor) -> torch.Tensor:
        M = M * column_scale.to(M)
        if proj == "v":
            D = self.R.shape[0]
            M = (self.R.T.to(M) @ M.reshape(-1, D, M.shape[-1])).reshape(M.shape)
        return M @ self.S1.to(M)


def qkv_bases(gm: GraphModule, sites: list[AttentionSite]) -> dict[int, QKVBasis]:
    """:class:`QKVBasis` of every site of the dense, unrotated ``gm`` (layer -> basis)."""
    if any(getattr(s, f"{p}_proj").factored for s in sites for p in ("q", "k", "v")):
        raise WsvdError("the rotated basis of q/k/v is that of the dense graph: take it before factorising")
    if any(fixed_rotation(name) for name, _ in gm.named_buffers()):
        raise WsvdError("the graph is already rotated: take the rotated basis of q/k/v from the unrotated graph")
    stream = find_residual_stream(gm)
    S1 = random_hadamard(sites[0].hidden_size, S1_SEED)
    bases = {}
    for site in sites:
        norm = next((n for n in stream.norms if site.q_proj.node in n.readers), None)
        if norm is None:
            raise WsvdError(f"layer {site.layer}: q_proj does not read an RMSNorm of the residual stream")
        gamma = (tensor_attr(gm, norm.gamma).detach().double().cpu() if norm.gamma
                 else torch.ones(site.hidden_size, dtype=torch.float64))
        if not bool((gamma != 0).all()):
            raise WsvdError(f"layer {site.layer}: the RMSNorm gain before q/k/v has zero entries, so the rotated "
                            "Fisher of local QAT is undefined there: use a recipe without QAT (e.g. qsvd)")
        bases[site.layer] = QKVBasis(gamma, S1, RotateValueHeads().rotation(site))
    return bases

"""Small helpers for editing an unlifted export graph module.

Export attributes every node to a module through ``meta["nn_module_stack"]`` and
records its output in ``meta["val"]``; a node created without them is attributed to
the root after re-export and breaks site finding. Every pass therefore creates
nodes through these helpers, which copy metadata from the node being replaced.

What the capture knows about the model and the passes read is kept in ``gm.meta`` under the
keys below (it survives ``copy.deepcopy``):

- ``TIED_HEAD``: the LM head reads the embedding table (``config.tie_word_embeddings``);
- ``FIRST_LAYER``: the model index of the graph's first decoder layer (a streamed layer graph;
  :func:`~wsvd_passes.graph.sites.find_sites` numbers sites from it);
- ``RESIDUAL_INPUT``: the graph's input is the model's residual stream between two layers, in
  whatever basis the caller rotates it to (a streamed layer graph: RotateResidual leaves it alone);
- ``NO_LAYERS``: a decoder with its layers left out (embedding, final norm, LM head), which has
  no attention sites.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

TIED_HEAD = "wsvd_tied_head"
FIRST_LAYER = "wsvd_first_layer"
RESIDUAL_INPUT = "wsvd_residual_input"
NO_LAYERS = "wsvd_no_layers"

_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn")


def is_call(node, *targets) -> bool:
    """Whether ``node`` is an fx node calling one of ``targets`` (False for constants and other args)."""
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def copy_meta(new: Node, like: Node, *, val=None) -> Node:
    """Give ``new`` the module attribution of ``like``; ``val`` is its example output, if known."""
    for key in _COPIED_META:
        if key in like.meta:
            new.meta[key] = like.meta[key]
    if val is not None:
        new.meta["val"] = val
    return new


def owner_and_name(target: str) -> tuple[str, str]:
    """Split 'a.b.c' into ('a.b', 'c')."""
    owner, _, name = target.rpartition(".")
    return owner, name


def add_tensor_attr(gm: GraphModule, target: str, value: torch.Tensor, *, parameter: bool) -> None:
    """Register ``value`` at dotted ``target`` as a parameter or (persistent) buffer.

    Intermediate submodules are created as empty ``nn.Module`` when missing.
    """
    owner_path, name = owner_and_name(target)
    owner = gm
    for part in filter(None, owner_path.split(".")):
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if hasattr(owner, name):
        raise ValueError(f"{target} already exists in the graph module")
    if parameter:
        owner.register_parameter(name, torch.nn.Parameter(value, requires_grad=value.is_floating_point()))
    else:
        owner.register_buffer(name, value)


def get_attr_node(gm: GraphModule, target: str, like: Node) -> Node:
    """A ``get_attr`` node for ``target`` placed before ``like`` and attributed to its module."""
    with gm.graph.inserting_before(like):
        node = gm.graph.get_attr(target)
    value = gm.get_parameter(target) if target in dict(gm.named_parameters()) else gm.get_buffer(target)
    return copy_meta(node, like, val=torch.empty_like(value, device="meta"))


def tensor_attr(gm: GraphModule, target: str) -> torch.Tensor:
    """The parameter or buffer stored at ``target``."""
    owner_path, name = owner_and_name(target)
    return getattr(gm.get_submodule(owner_path) if owner_path else gm, name)


def remove_attr_if_unused(gm: GraphModule, target: str) -> None:
    """Delete a parameter/buffer no node uses any more (else it survives re-export),
    with its dangling ``get_attr`` nodes."""
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]
    if any(n.users for n in readers):
        return
    for n in readers:
        gm.graph.erase_node(n)
    owner_path, name = owner_and_name(target)
    delattr(gm.get_submodule(owner_path) if owner_path else gm, name)


def logits_linears(gm: GraphModule) -> list[Node]:
    """The linears whose outputs are graph outputs: the LM head (its output is the logits)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return [n for n in output.all_input_nodes if is_call(n, torch.ops.aten.linear.default)]


def logits_head(gm: GraphModule) -> Node | None:
    """The LM head when the graph returns its output unchanged and nothing else: the one bias-free linear
    ``logits = linear(h, W)``; None for other graphs (several outputs, a bias, a soft cap or scale after the head)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    heads = logits_linears(gm)
    if len(output.all_input_nodes) != 1 or len(heads) != 1 or len(heads[0].users) != 1:
        return None
    head = heads[0]
    return head if len(head.args) == 2 or head.args[2] is None else None


def val_like(node: Node, source: Node) -> Node:
    """Set ``meta["val"]`` of ``node``, whose output has the shape and dtype of its input ``source``, without running
    its op: an empty fake tensor like the source's (symbolic shapes kept). :func:`infer_val` runs the op on fake
    tensors, and where the op views symbolic dims (the grouped activation quantiser's unflatten) each view is a
    sympy proof in the graph's ShapeEnv: measured 224 s of a 7-minute SmolLM2 W8A8 compress under cProfile."""
    val = source.meta["val"]
    with val.fake_mode:
        node.meta["val"] = torch.empty_like(val)
    return node


def infer_val(gm: GraphModule, node: Node) -> Node:
    """Set ``meta["val"]`` of a new ``call_function`` node by running its op on fake tensors
    of the graph's own fake mode (symbolic shapes included); site finding reads these shapes."""
    from torch._subclasses.fake_tensor import FakeTensor

    fakes = [v for a in node.all_input_nodes for v in torch.utils._pytree.tree_leaves(a.meta.get("val"))
             if isinstance(v, FakeTensor)]  # a tuple-valued input (e.g. codes, scales) counts too
    if not fakes:
        raise ValueError(f"cannot infer the output of {node.name}: no input carries a fake tensor")
    mode = fakes[0].fake_mode

    def to_fake(a):
        if not isinstance(a, Node):
            return a
        if a.op == "get_attr":
            return mode.from_tensor(tensor_attr(gm, a.target))
        return a.meta["val"]

    args = torch.fx.node.map_aggregate(node.args, to_fake)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, to_fake)
    with mode, torch.no_grad():
        node.meta["val"] = node.target(*args, **kwargs)
    return node

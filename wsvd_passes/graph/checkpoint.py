"""Running a captured graph with activation checkpointing per decoder layer, for backward passes that fit.

A backward pass through the captured ``input_ids -> logits`` graph keeps what autograd saves in the forward: for
a decoder of L layers over one window of S tokens, L times a layer's activations (attention inputs, q/k/v, the
MLP's [S, I] intermediates, ...), e.g. about 0.4 GB for SmolLM2-135M (L = 30, S = 256) in float32.
:class:`LayerCheckpointed` runs the graph node by node (the fx interpreter's node semantics) and each decoder
layer's nodes (a maximal run of consecutive nodes that export attributes to the same ``...layers.<i>`` module,
:func:`layer_of`) as one non-reentrant :func:`torch.utils.checkpoint.checkpoint` segment:

    h_{i+1} = checkpoint(layer_i, h_i, <the other values it reads: RoPE tables, mask, weights>)

Only a segment's inputs are kept (h_i [B, S, E] and references to tensors that live anyway); its activations
are recomputed from them when backward reaches the layer, and freed once its gradients are through. Backward
then holds the L boundary tensors, one layer's activations and what lies outside the layers (embedding, final
norm, LM head, loss) instead of all of them. The recomputation runs the same ops on the same values, so outputs
and gradients are the same bit for bit (tested); it costs one more forward of the layers.
"""

from __future__ import annotations

import dataclasses
import re

from torch.fx import GraphModule, Interpreter, Node
from torch.fx import _pytree as fx_pytree
from torch.fx.node import map_arg
from torch.utils.checkpoint import checkpoint

from .sites import module_path

_LAYER = re.compile(r"^(.*?(?:^|\.)layers\.\d+)(?:\.|$)")
_COMPUTE = ("call_function", "call_method", "call_module")


def layer_of(node: Node) -> str | None:
    """The decoder layer module (``model.model.layers.3``) that export attributes ``node`` to, or None (embedding,
    final norm, LM head, graph inputs and stored tensors)."""
    if node.op not in _COMPUTE:
        return None
    match = _LAYER.match(module_path(node))
    return match.group(1) if match else None


@dataclasses.dataclass
class _Segment:
    layer: str | None  # None: run plainly
    nodes: list[Node]
    inputs: list[Node]  # values computed before the segment that it reads
    outputs: list[Node]  # its values read after it
    dead: list[Node]  # values last read in this segment (dropped after it)


class LayerCheckpointed:
    """``captured.gm`` as a callable with the graph's signature (``run(**kwargs)`` like ``gm(**kwargs)``), whose
    decoder layers are checkpointed segments (module docstring). Build it once per graph; the graph must not be
    edited while it is in use."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self._interpreter = Interpreter(gm)  # its per-op methods (get_attr, call_function, ...)
        self._segments = _plan(gm)

    @property
    def layers(self) -> int:
        """How many checkpointed segments the graph has (one per decoder layer)."""
        return sum(s.layer is not None for s in self._segments)

    def __call__(self, *args, **kwargs):
        return self._run_graph(None, args, kwargs)

    def arguments_of(self, node: Node, *args, **kwargs) -> tuple:
        """The values ``node`` (outside the decoder layers, e.g. the LM head) would be called with, running the
        graph only as far as that: callers compute the rest themselves (e.g. the head's loss in chunks)."""
        if layer_of(node) is not None:
            raise ValueError(f"{node.name} lies inside {layer_of(node)}: stop at a node outside the decoder layers")
        return self._run_graph(node, args, kwargs)

    def _run_graph(self, stop: Node | None, args: tuple, kwargs: dict):
        flat = iter(fx_pytree.tree_flatten_spec((args, kwargs), self.gm._in_spec))
        env: dict[Node, object] = {}
        for segment in self._segments:
            if segment.layer is None:
                for node in segment.nodes:
                    if node is stop:
                        return map_arg(node.args, env.__getitem__)
                    env[node] = next(flat) if node.op == "placeholder" else self._run(node, env)
            else:
                values = checkpoint(self._segment, segment, *(env[n] for n in segment.inputs), use_reentrant=False)
                env.update(zip(segment.outputs, values))
            for node in segment.dead:
                env.pop(node, None)
        (output,) = (n for n in self.gm.graph.nodes if n.op == "output")
        return self.gm.graph._codegen.process_outputs(env[output])

    def _run(self, node: Node, env: dict[Node, object]):
        args, kwargs = map_arg((node.args, node.kwargs), env.__getitem__)
        return getattr(self._interpreter, node.op)(node.target, args, kwargs)

    def _segment(self, segment: _Segment, *inputs) -> tuple:
        env = dict(zip(segment.inputs, inputs))
        for node in segment.nodes:
            env[node] = self._run(node, env)
        return tuple(env[n] for n in segment.outputs)


def _plan(gm: GraphModule) -> list[_Segment]:
    """The graph's nodes cut into maximal runs of one decoder layer (or of none), with each run's inputs, outputs and
    the values it reads last."""
    runs: list[tuple[str | None, list[Node]]] = []
    for node in gm.graph.nodes:
        layer = layer_of(node)
        if runs and runs[-1][0] == layer:
            runs[-1][1].append(node)
        else:
            runs.append((layer, [node]))
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    last_read = {node: max((position[u] for u in node.users), default=position[node]) for node in gm.graph.nodes}
    segments = []
    for layer, nodes in runs:
        members = set(nodes)
        inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in members))
        outputs = [n for n in nodes if any(u not in members for u in n.users)]
        end = position[nodes[-1]]
        dead = [n for n in [*inputs, *nodes] if last_read[n] <= end and n.op != "output"]
        segments.append(_Segment(layer, nodes, inputs, outputs, dead))
    return segments

"""Composable graph passes and the pipeline that runs them in order.

A pass is a :class:`GraphPass`: a ``torch.fx.passes.infra`` ``PassBase`` over the
unlifted graph module of a :class:`~wsvd_passes.graph.capture.CapturedGraph`. It checks
its inputs in :meth:`GraphPass.requires`, edits the graph in
:meth:`GraphPass.transform` given freshly found attention sites, and may add
parameters and buffers (see :mod:`wsvd_passes.graph.graph_utils`).

:class:`Pipeline` runs passes with torch's ``PassManager`` and, after each one,
verifies the graph: it lints, recompiles, and finds the attention sites again, so
a pass that breaks the attention pattern fails at once with its name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager

from ..errors import WsvdError
from .capture import CapturedGraph
from .sites import AttentionSite, find_sites


class GraphPass(PassBase):
    """Base class of all wsvd passes. Subclasses implement :meth:`transform`."""

    def requires(self, graph_module: GraphModule) -> None:
        find_sites(graph_module)  # raises a one-line WsvdError when the pattern is missing

    def transform(self, gm: GraphModule, sites: list[AttentionSite]) -> bool:
        """Edit ``gm`` in place; return True when anything changed."""
        raise NotImplementedError

    def __call__(self, graph_module: GraphModule) -> PassResult:
        try:
            return super().__call__(graph_module)
        except WsvdError as e:
            raise WsvdError(f"{self.name}: {e}") from None

    def call(self, graph_module: GraphModule) -> PassResult:
        modified = self.transform(graph_module, find_sites(graph_module))
        if modified:
            graph_module.graph.lint()
            graph_module.recompile()
        return PassResult(graph_module, modified)

    @property
    def name(self) -> str:
        return type(self).__name__


def verify_graph(gm: GraphModule) -> None:
    """Structural check run after every pass: a valid graph that still has its attention sites."""
    gm.graph.lint()
    find_sites(gm)


@dataclasses.dataclass
class Pipeline:
    """Run ``passes`` in order over a captured graph, verifying after each one.

    ``pipeline(captured)`` edits ``captured.gm`` in place and returns it, so that
    ``captured.reexport()`` yields the transformed ``ExportedProgram``.
    """

    passes: Sequence[GraphPass]
    verify: bool = True

    def __call__(self, captured: CapturedGraph) -> CapturedGraph:
        manager = PassManager(passes=list(self.passes), run_checks_after_each_pass=self.verify)
        if self.verify:
            manager.add_checks(verify_graph)
        try:
            result = manager(captured.gm)
        except WsvdError:
            raise
        except Exception as e:
            # PassManager wraps pass failures in a bare Exception; surface our one-line error.
            cause = e
            while cause is not None and not isinstance(cause, WsvdError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise cause from None
            raise
        captured.gm = result.graph_module
        return captured


def same_function(a: torch.nn.Module, b: torch.nn.Module, inputs: Sequence[dict], *, atol: float, rtol: float = 0.0) -> float:
    """Largest absolute output difference of ``a`` and ``b`` over ``inputs``; raises if above tolerance."""
    worst = 0.0
    with torch.no_grad():
        for kwargs in inputs:
            out_a, out_b = a(**kwargs), b(**kwargs)
            diff = (out_a - out_b).abs()
            worst = max(worst, float(diff.max()))
            if not torch.allclose(out_a, out_b, atol=atol, rtol=rtol):
                raise AssertionError(f"outputs differ by {float(diff.max()):.3g} (atol {atol})")
    return worst

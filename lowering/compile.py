"""Lower a latent-KV decode graph to the fused op and compile its decode step."""

from __future__ import annotations

from collections.abc import Callable

import torch

from wsvd_passes.capture import CapturedGraph
from wsvd_passes.pipeline import Pipeline

from .match import LowerLatentAttention


def lower(decoder: CapturedGraph) -> CapturedGraph:
    """Replace every latent-cache attention of ``decoder`` (in place) by ``wsvd::latent_attention``.

    The lowered graph has no SDPA left, so the pipeline's site check is off; the graph is linted.
    """
    Pipeline([LowerLatentAttention()], verify=False)(decoder)
    decoder.gm.graph.lint()
    return decoder


def compile_step(decoder: CapturedGraph, **options) -> Callable:
    """``torch.compile`` of the decode step (static shapes, one graph); the op stays opaque."""
    return torch.compile(decoder.gm, fullgraph=True, dynamic=False, **options)

"""wsvd_passes: low-rank and low-bit compression of attention as torch.fx graph passes.

The flow: :func:`load_model` -> :func:`capture_forward` / :func:`capture_decode`
(``torch.export``) -> :func:`find_sites` (typed attention records) -> calibration
(:func:`collect_input_stats`, :func:`collect_gradients`) -> a :class:`Pipeline` of
:class:`GraphPass` objects -> :func:`evaluate` or :func:`greedy_generate`.
:func:`load` rebuilds a compressed model saved by ``wsvd compress --out DIR``.
"""

from .artifacts.artifact import Artifact, load
from .compression.calibration import (
    InsertInputObservers,
    RemoveObservers,
    collect_gradients,
    collect_input_stats,
    next_token_loss,
)
from .errors import WsvdError
from .eval.evaluation import EvalResult, evaluate
from .eval.generation import generate, greedy_generate
from .graph.capture import CapturedGraph, capture_decode, capture_forward
from .graph.pipeline import GraphPass, Pipeline, same_function
from .graph.sites import AttentionSite, find_sites
from .models.registry import LoadedModel, load_model
from .moved import install as _install_moved_paths

_install_moved_paths(__name__)  # wsvd_passes.compress, .data, ... (before the subpackages) import as before

__all__ = [
    "Artifact", "AttentionSite", "CapturedGraph", "EvalResult", "GraphPass", "InsertInputObservers", "LoadedModel", "Pipeline",
    "RemoveObservers", "WsvdError", "capture_decode", "capture_forward", "collect_gradients", "collect_input_stats",
    "evaluate", "find_sites", "generate", "greedy_generate", "load", "load_model", "next_token_loss", "same_function",
]

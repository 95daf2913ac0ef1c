"""wsvd_passes: low-rank and low-bit compression of attention as torch.fx graph passes.

The flow: :func:`load_model` -> :func:`capture_forward` / :func:`capture_decode`
(``torch.export``) -> :func:`find_sites` (typed attention records) -> calibration
(:func:`collect_input_stats`, :func:`collect_gradients`) -> a :class:`Pipeline` of
:class:`GraphPass` objects -> :func:`evaluate` or :func:`greedy_generate`.
:func:`load` rebuilds a compressed model saved by ``wsvd compress --out DIR``.
"""

from .artifact import Artifact, load
from .calibration import InsertInputObservers, RemoveObservers, collect_gradients, collect_input_stats, next_token_loss
from .capture import CapturedGraph, capture_decode, capture_forward
from .errors import WsvdError
from .evaluation import EvalResult, evaluate
from .generation import generate, greedy_generate
from .models import LoadedModel, load_model
from .pipeline import GraphPass, Pipeline, same_function
from .sites import AttentionSite, find_sites

__all__ = [
    "Artifact", "AttentionSite", "CapturedGraph", "EvalResult", "GraphPass", "InsertInputObservers", "LoadedModel", "Pipeline",
    "RemoveObservers", "WsvdError", "capture_decode", "capture_forward", "collect_gradients", "collect_input_stats",
    "evaluate", "find_sites", "generate", "greedy_generate", "load", "load_model", "next_token_loss", "same_function",
]

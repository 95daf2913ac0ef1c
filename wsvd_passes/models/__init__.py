"""Models in: the registry of names and local checkpoints, VLM loading, random checkpoints of real shapes."""

from .registry import MODEL_NAMES, SMOLLM2, LoadedModel, cache_dir, cast_parameters, load_model, smollm2_checkpoint

__all__ = ["LoadedModel", "MODEL_NAMES", "SMOLLM2", "cache_dir", "cast_parameters", "load_model",
           "smollm2_checkpoint"]  # the names of the module wsvd_passes.models before it became this package

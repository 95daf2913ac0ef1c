"""vLLM plugin (entry point ``vllm.general_plugins``): registers the ``wsvd export vllm`` architectures.

vLLM calls :func:`register` in every process it starts; the model module is imported lazily, by name.
"""

from __future__ import annotations

from .format import ARCHITECTURES

MODEL_CLASS = "wsvd_passes.serve.vllm_model:WsvdForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    for architecture in ARCHITECTURES.values():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, MODEL_CLASS)

"""vLLM plugin (entry point ``vllm.general_plugins``): registers the ``wsvd export vllm`` architectures and the
latent-cache attention backend (``WSVD_LATENT``, :mod:`.latent_cache`) through vLLM's registration APIs.

vLLM calls :func:`register` in every process it starts; the model and backend modules are imported lazily, by name.
"""

from __future__ import annotations

from .format import ARCHITECTURES, LATENT_BACKEND

MODEL_CLASS = "wsvd_passes.serve.vllm_model:WsvdForCausalLM"
LATENT_BACKEND_CLASS = "wsvd_passes.serve.latent_cache.WsvdLatentBackend"


def register() -> None:
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    for architecture in ARCHITECTURES.values():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, MODEL_CLASS)
    if LATENT_BACKEND not in AttentionBackendEnum.__members__:
        register_backend(LATENT_BACKEND, LATENT_BACKEND_CLASS)

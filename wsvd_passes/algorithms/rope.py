"""The model's own rotary embedding parameters, for code that applies RoPE itself.

Hugging Face Llama-family RoPE at position p: with ``freqs = p * inv_freq`` [D/2] and
``emb = cat(freqs, freqs)``, ``cos = cos(emb) * a`` and ``sin = sin(emb) * a`` where
``a`` is the rope type's attention scaling (1 for the default type); then
``x_rot = x * cos + rotate_half(x) * sin``.
"""

from __future__ import annotations

import torch

from ..errors import WsvdError


def rope_parameters(config) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 [D/2], attention scaling) computed as the model computes them."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if "mrope_section" in params:
        raise WsvdError("multimodal RoPE (mrope_section, Qwen2-VL) rotates keys at 3-row (t, h, w) positions, but the "
                        "latent cache rebuilds them at 1-D cache positions: the latent-KV rewrite does not support it")
    if rope_type == "dynamic":
        raise WsvdError("dynamic RoPE changes its frequencies with the sequence length: the latent cache "
                        "cannot rebuild keys for it; use a model with a fixed rope type")
    if rope_type == "default":
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise WsvdError(f"unknown rope type {rope_type!r} in the model config")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def rope_half_tables(inv_freq: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``j * inv_freq`` (the angle rounded to float32, as the model computes it),
    float32 [length, D/2] for positions j = 0 .. length-1, unscaled: the fused kernel's tables."""
    freqs = torch.arange(length, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq.float()[None, :]
    return freqs.cos(), freqs.sin()


def rope_tables(inv_freq: torch.Tensor, attention_scaling: float, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, float32 [length, D], for positions 0 .. length-1, times the attention scaling."""
    cos, sin = rope_half_tables(inv_freq, length)
    return torch.cat([cos, cos], dim=-1) * attention_scaling, torch.cat([sin, sin], dim=-1) * attention_scaling

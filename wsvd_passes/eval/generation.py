"""Token-by-token generation through a captured static-cache decode graph.

The prompt is fed one token per step (each step writes its K/V, or their latents,
into the cache at ``cache_position``), then each new token is the argmax (greedy)
or a sample of the last logits. ``step`` defaults to the graph module itself; pass
a compiled or lowered step (see :mod:`lowering`) with the same calling convention
``step(input_ids=[B, 1], cache_position=[1]) -> logits [B, 1, V]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import WsvdError
from ..graph.capture import CapturedGraph
from ..graph.sites import CACHE_WRITES


def cache_buffers(decoder: CapturedGraph) -> dict[str, torch.Tensor]:
    """Every buffer the decode graph writes in place with a cache write (dense or latent caches)."""
    if decoder.kind != "decode":
        raise WsvdError("generation needs the decode graph: capture it with capture_decode()")
    gm = decoder.gm
    targets = {n.args[0].target for n in gm.graph.nodes
               if n.op == "call_function" and n.target in CACHE_WRITES and n.args[0].op == "get_attr"}
    if not targets:
        raise WsvdError("the decode graph writes no KV cache")
    return {t: gm.get_buffer(t) for t in sorted(targets)}


def reset_cache(decoder: CapturedGraph) -> int:
    """Zero every KV-cache buffer of a decode graph; returns the cache length (positions)."""
    buffers = cache_buffers(decoder)
    for b in buffers.values():
        b.zero_()
    return min(b.shape[2] for b in buffers.values())


@torch.no_grad()
def generate(
    decoder: CapturedGraph, prompt: torch.Tensor, max_new_tokens: int, *, step: Callable | None = None,
    temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` (int64 [B, P]); returns [B, P + max_new_tokens] on the decoder's device.

    ``temperature == 0`` is greedy; otherwise tokens are sampled from softmax(logits / T),
    restricted to the ``top_k`` most likely when given, with a seeded generator.
    """
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise WsvdError(f"the prompt must be token ids of shape [batch, length>0], got {tuple(prompt.shape)}")
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise WsvdError("temperature must be >= 0 and top_k >= 1")
    batch = decoder.example_kwargs["input_ids"].shape[0]
    if prompt.shape[0] != batch:
        raise WsvdError(f"the decode graph was captured for batch {batch}, the prompt has batch {prompt.shape[0]}")
    cache_len = reset_cache(decoder)
    total = prompt.shape[1] + max_new_tokens
    if total > cache_len:
        raise WsvdError(
            f"prompt ({prompt.shape[1]}) + new tokens ({max_new_tokens}) exceed the static cache of {cache_len} "
            "positions: capture the decode graph with a larger max_cache_len"
        )
    step = decoder.gm if step is None else step
    device = decoder.device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    tokens = torch.empty(batch, total, dtype=prompt.dtype, device=device)
    tokens[:, : prompt.shape[1]] = prompt
    for pos in range(total - 1):
        # a fresh contiguous [B, 1] tensor: a compiled step then sees the same strides at every length
        ids = tokens[:, pos : pos + 1].clone(memory_format=torch.contiguous_format)
        logits = step(input_ids=ids, cache_position=torch.tensor([pos], device=device))
        if pos + 1 >= prompt.shape[1]:
            tokens[:, pos + 1] = _next_token(logits[:, -1].float(), temperature, top_k, generator)
    return tokens


def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def greedy_generate(decoder: CapturedGraph, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation through the decode graph itself."""
    return generate(decoder, prompt, max_new_tokens)

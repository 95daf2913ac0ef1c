"""Token-by-token generation through a captured static-cache decode graph.

The prompt is fed one token per step (each step writes its K/V into the cache at
``cache_position``), then greedy decoding appends the argmax token. This is the
reference loop; the compiled and lowered loop of :mod:`lowering` follows the same
calling convention ``gm(input_ids [B, 1], cache_position [1]) -> logits [B, 1, V]``.
"""

from __future__ import annotations

import torch

from .capture import CapturedGraph
from .errors import WsvdError
from .graph_utils import tensor_attr
from .sites import find_sites


def reset_cache(decoder: CapturedGraph) -> int:
    """Zero every KV-cache buffer of a decode graph; returns the cache length (positions)."""
    if decoder.kind != "decode":
        raise WsvdError("generation needs the decode graph: capture it with capture_decode()")
    lengths = set()
    for site in find_sites(decoder.gm):
        for write in (site.k_cache, site.v_cache):
            tensor_attr(decoder.gm, write.buffer).zero_()
            lengths.add(write.max_len)
    return min(lengths)


@torch.no_grad()
def greedy_generate(decoder: CapturedGraph, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation of ``prompt`` (int64 [B, P]); returns [B, P + max_new_tokens]."""
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise WsvdError(f"the prompt must be token ids of shape [batch, length>0], got {tuple(prompt.shape)}")
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
    tokens = torch.empty(batch, total, dtype=prompt.dtype)
    tokens[:, : prompt.shape[1]] = prompt
    for pos in range(total - 1):
        logits = decoder.gm(input_ids=tokens[:, pos : pos + 1], cache_position=torch.tensor([pos]))
        if pos + 1 >= prompt.shape[1]:
            tokens[:, pos + 1] = logits[:, -1].argmax(-1)
    return tokens

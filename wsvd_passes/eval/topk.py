"""Next-token distributions kept as their k most likely tokens plus a tail, and their KL to a full distribution.

A distribution p over V tokens is kept as :class:`TopK`: the log-probabilities of its k most likely tokens T, their
ids, and the log of the rest's mass, log p_tail = logsumexp_{i not in T} log p_i (a logsumexp over the complement:
no cancellation when the top k hold nearly all the mass; -inf when k = V). Per position that is k (4 + b) + 4 bytes,
b = 2 bytes per id when V <= 65536 (uint16), else 4 (int32), instead of 4 V for the float32 logits.

The KL of p to a full q [..., V], with q_tail = sum_{i not in T} q_i (also a logsumexp over the complement),

    KL_k(p || q) = sum_{i in T} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)

is the exact KL of the two distributions merged onto T and one tail token. By the log-sum inequality,
sum_{i not in T} p_i log(p_i / q_i) >= p_tail log(p_tail / q_tail), so KL_k <= KL(p || q), with equality at k = V
(or when q is proportional to p off T). Its gradient in q's logits z is q_j - p_j on T and q_j (1 - p_tail / q_tail)
off T: it pulls q's tail mass to p_tail without shaping the tail.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class TopK(NamedTuple):
    """p kept as its top k: log-probabilities [..., k] float32 (descending), ids [..., k], log p_tail [...]."""

    logp: torch.Tensor
    ids: torch.Tensor  # uint16 when V <= 65536, else int32
    tail: torch.Tensor


def top_k(logits: torch.Tensor, k: int) -> TopK:
    """p = softmax(logits [..., V]) kept as its top min(k, V) tokens and its tail (float32)."""
    logp = F.log_softmax(logits.float(), -1)
    top, ids = logp.topk(min(k, logp.shape[-1]), -1)
    tail = logp.scatter(-1, ids, -math.inf).logsumexp(-1)
    return TopK(top, ids.to(torch.uint16 if logp.shape[-1] <= 2**16 else torch.int32), tail)


def kl_topk(p: TopK, logq: torch.Tensor) -> torch.Tensor:
    """KL_k(p || q) per position [...] for q's log-probabilities ``logq`` [..., V], differentiable in ``logq``."""
    ids = p.ids.long()
    kl = (p.logp.exp() * (p.logp - logq.gather(-1, ids))).sum(-1)
    if ids.shape[-1] == logq.shape[-1]:  # k = V: no tail
        return kl
    p_tail, q_tail = p.tail.exp(), logq.scatter(-1, ids, -math.inf).logsumexp(-1)
    return kl + torch.xlogy(p_tail, p_tail) - p_tail * q_tail  # p_tail (log p_tail - log q_tail), 0 when p_tail = 0

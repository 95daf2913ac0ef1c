"""Language-model evaluation on token windows: perplexity, KL to a reference, top-1 agreement.

Over windows of S tokens each position t < S-1 predicts token t+1 (the shift of
:func:`~wsvd_passes.compression.calibration.next_token_loss`). With ``N`` scored positions:

    ppl  = exp( (1/N) sum -log p(x_{t+1} | x_<=t) )
    kl   = (1/N) sum KL( p_ref(. | x_<=t) || p(. | x_<=t) )      (nats)
    top1 = (1/N) sum [argmax p_ref = argmax p]

Both models see the same windows in the same batches. Image-text samples (dicts of graph
kwargs with ``labels``, :mod:`wsvd_passes.eval.mm_data`) are scored on their supervised positions
only (labels != -100, shifted once), one sample per call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..compression.calibration import split_batch
from ..errors import WsvdError

Logits = Callable[[torch.Tensor | dict], torch.Tensor]  # int64 [B, S] (or image-text graph kwargs) -> float [B, S, V]


@dataclasses.dataclass
class EvalResult:
    ppl: float
    tokens: int
    nll: float  # mean negative log-likelihood, nats/token
    kl: float | None = None
    top1: float | None = None
    ref_ppl: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class MemoLogits:
    """``fn``'s logits computed once per window and reused: token ids [B, S] are memoised row by row (the rows
    not seen yet are computed in one call, so windows met again in other batches are not recomputed), image-text
    graph kwargs as a whole. Holds what ``fn`` returns per window: float logits [S, V] (n windows x S x V x 4
    bytes in float32), or a tuple of tensors such as :class:`~wsvd_passes.eval.topk.TopK` (row by row, each field)."""

    def __init__(self, fn: Logits):
        self.fn, self.memo = fn, {}

    def __call__(self, inputs):
        if isinstance(inputs, dict):
            key = tuple(_key(inputs[k]) for k in sorted(inputs))
            if key not in self.memo:
                self.memo[key] = self.fn(inputs)
            return self.memo[key]
        keys = [_key(row) for row in inputs]
        first: dict[tuple, int] = {}  # each window not seen yet, at its first row in the batch
        for i, k in enumerate(keys):
            if k not in self.memo:
                first.setdefault(k, i)
        if missing := list(first.values()):
            for i, row in zip(missing, _rows(self.fn(inputs[missing]))):
                self.memo[keys[i]] = row
        return _stack([self.memo[k] for k in keys])


def _rows(out: torch.Tensor | tuple) -> list:
    """A batch's output [B, ...] (a tensor or a tuple of tensors) row by row."""
    if isinstance(out, torch.Tensor):
        return list(out.unbind())
    return [type(out)(*fields) for fields in zip(*(t.unbind() for t in out))]


def _stack(rows: list) -> torch.Tensor | tuple:
    """Rows back into a batch: the inverse of :func:`_rows`."""
    if isinstance(rows[0], torch.Tensor):
        return torch.stack(rows)
    return type(rows[0])(*(torch.stack(field) for field in zip(*rows)))


def _key(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def evaluate(
    logits_fn: Logits,
    windows: torch.Tensor | list[dict],
    *,
    reference: Logits | None = None,
    batch_size: int = 8,
    progress: bool = True,
    device: torch.device | None = None,
) -> EvalResult:
    """Score ``logits_fn`` on ``windows`` (int64 [n, S], or image-text samples); compare with ``reference``.

    Inputs are moved to ``device`` (the models' device) when given; scores are float64.
    """
    if isinstance(windows, list):
        batches = windows
    elif windows.ndim != 2 or windows.shape[1] < 2:
        raise WsvdError(f"evaluation windows must be [n, S>=2] token ids, got {tuple(windows.shape)}")
    else:
        batches = list(windows.split(batch_size))
    nll = kl = agree = ref_nll = 0.0
    tokens = 0
    with torch.no_grad():
        for batch in tqdm(batches, desc="evaluation", disable=not progress):
            kwargs, labels = split_batch(batch, device)
            inputs = kwargs if isinstance(batch, dict) else kwargs["input_ids"]
            logits = logits_fn(inputs)
            keep = labels[:, 1:].to(logits.device) != -100
            target = labels[:, 1:].to(logits.device)[keep]
            logp = F.log_softmax(logits[:, :-1].double(), -1)[keep]
            nll += float(-logp.gather(1, target[:, None]).sum())
            tokens += target.numel()
            if reference is not None:
                ref = F.log_softmax(reference(inputs)[:, :-1].double(), -1)[keep]
                ref_nll += float(-ref.gather(1, target[:, None]).sum())
                kl += float((ref.exp() * (ref - logp)).sum())
                agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
    if not math.isfinite(nll):
        raise WsvdError("the model produced non-finite log-probabilities on the evaluation data")
    result = EvalResult(ppl=math.exp(nll / tokens), tokens=tokens, nll=nll / tokens)
    if reference is not None:
        result.kl, result.top1, result.ref_ppl = kl / tokens, agree / tokens, math.exp(ref_nll / tokens)
    return result

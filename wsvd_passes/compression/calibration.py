"""Calibration statistics and gradients, collected on the captured graph.

Input statistics (pt2e style): :class:`InsertInputObservers` puts an identity
:class:`InputStatsObserver` module on the attention input of every site (the normalised
hidden state shared by q/k/v, which whitening needs); running calibration batches
through the graph accumulates, per input x of width E over N tokens,

    gram    = (1/N) sum_t x_t x_t^T   float64 [E, E]
    absmean = (1/N) sum_t |x_t|       float64 [E]

:class:`RemoveObservers` takes them out again. :func:`collect_input_stats` does
all three steps.

Gradients: :func:`collect_gradients` runs one backward pass per calibration
sequence (a "sample") and reduces the per-sample gradients g of the next-token
loss w.r.t. chosen weights. The forward keeps each decoder layer's input only and
backward recomputes the layer's activations from it
(:class:`~wsvd_passes.graph.checkpoint.LayerCheckpointed`: the same gradients bit for bit,
one layer's activations alive at a time); a graph that ends in its LM head stops at the head's input and
:func:`head_loss` makes the logits a chunk of positions at a time. The built-in reduction is the diagonal Fisher
F = E_samples[g * g]; a callback sees every per-sample gradient for other
reductions (e.g. projections onto singular vectors for rank importance).

Data comes as text windows (int64 token ids [n, S], labels = ids) or as image-text samples:
dicts of graph kwargs (``inputs_embeds`` [1, S, E], ...) plus ``labels`` [1, S] with -100 on
unsupervised positions (:mod:`wsvd_passes.eval.mm_data`); :func:`split_batch` tells them apart.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence

import torch
from torch.fx import GraphModule
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..errors import WsvdError
from ..graph.capture import CapturedGraph
from ..graph.checkpoint import LayerCheckpointed
from ..graph.graph_utils import copy_meta, logits_head
from ..graph.pipeline import GraphPass, Pipeline
from ..graph.sites import PASSTHROUGH_MODULE_PREFIX as OBSERVER_PREFIX
from ..graph.sites import AttentionSite, find_sites
from .memory import trim_heap


class InputStatsObserver(torch.nn.Module):
    """Identity module accumulating float64 Gram matrix and abs-sum of its input's last dim."""

    def __init__(self, width: int, device: torch.device | str = "cpu"):
        super().__init__()
        self.register_buffer("gram_sum", torch.zeros(width, width, dtype=torch.float64, device=device))
        self.register_buffer("abs_sum", torch.zeros(width, dtype=torch.float64, device=device))
        self.register_buffer("tokens", torch.zeros((), dtype=torch.int64, device=device))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        self.gram_sum += flat.T @ flat
        self.abs_sum += flat.abs().sum(0)
        self.tokens += flat.shape[0]
        return x


@dataclasses.dataclass
class InputStats:
    """Token-normalised statistics of one attention input of width E."""

    gram: torch.Tensor  # float64 [E, E]
    absmean: torch.Tensor  # float64 [E]
    tokens: int


@dataclasses.dataclass
class SiteStats:
    qkv: InputStats  # shared input of q_proj, k_proj, v_proj


class InsertInputObservers(GraphPass):
    """Route the q/k/v input of every site through an observer."""

    def transform(self, gm: GraphModule, sites: list[AttentionSite]) -> bool:
        for site in sites:
            x, name = site.qkv_input, f"{OBSERVER_PREFIX}{site.layer}_qkv"
            if hasattr(gm, name):
                raise WsvdError(f"observers are already inserted (found {name}): run RemoveObservers first")
            gm.add_module(name, InputStatsObserver(x.meta["val"].shape[-1], x.meta["val"].device))
            with gm.graph.inserting_after(x):
                obs = copy_meta(gm.graph.call_module(name, (x,)), site.q_proj.node, val=x.meta.get("val"))
            x.replace_all_uses_with(obs, delete_user_cb=lambda user: user is not obs)
        return True


class RemoveObservers(GraphPass):
    """Undo :class:`InsertInputObservers`: reconnect inputs and delete the observer modules."""

    def transform(self, gm: GraphModule, sites: list[AttentionSite]) -> bool:
        found = False
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and node.target.startswith(OBSERVER_PREFIX):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                gm.delete_submodule(node.target)
                found = True
        return found


def _stats(obs: InputStatsObserver, where: str) -> InputStats:
    n = int(obs.tokens)
    if n == 0:
        raise WsvdError(f"{where}: the observer saw no tokens; feed calibration batches through the graph first")
    gram, absmean = obs.gram_sum / n, obs.abs_sum / n
    if not (torch.isfinite(gram).all() and torch.isfinite(absmean).all()):
        raise WsvdError(
            f"{where}: calibration statistics contain NaN or inf; the model overflows on the calibration "
            "data (check the checkpoint's dtype and the data)"
        )
    return InputStats(gram, absmean, n)


def split_batch(batch: torch.Tensor | dict, device: torch.device | None = None) -> tuple[dict, torch.Tensor]:
    """(graph kwargs, labels [B, S]) of token ids [B, S] (labels = ids) or a dict of graph kwargs with "labels";
    the graph kwargs are moved to ``device`` when given (labels stay where they are)."""
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise WsvdError("an image-text batch needs 'labels' [B, S] (-100 where not supervised): build it with mm_data")
        kwargs, labels = {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    else:
        kwargs, labels = {"input_ids": batch}, batch
    if device is not None:
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
    return kwargs, labels


def as_batches(data: torch.Tensor | Sequence[dict], batch_size: int) -> list:
    """Text windows [n, S] in batches of ``batch_size``; image-text samples (batch 1 each) one by one."""
    return list(data) if isinstance(data, (list, tuple)) else list(data.split(batch_size))


def collect_input_stats(captured: CapturedGraph, batches: Iterable[torch.Tensor | dict], *, progress: bool = True) -> list[SiteStats]:
    """Run ``batches`` (int64 [B, S] token ids, or image-text dicts) through the graph; return stats per site."""
    if captured.kind != "forward":
        raise WsvdError("calibration needs the full-sequence graph: capture it with capture_forward()")
    Pipeline([InsertInputObservers()])(captured)
    head = logits_head(captured.gm)  # the statistics are all read below it: stop at its input, no [B, S, V] logits
    run = captured.gm if head is None else functools.partial(LayerCheckpointed(captured.gm).arguments_of, head)
    try:
        with torch.no_grad():
            for batch in tqdm(list(batches), desc="calibration statistics", disable=not progress):
                run(**split_batch(batch, captured.device)[0])
        return [SiteStats(_stats(getattr(captured.gm, f"{OBSERVER_PREFIX}{s.layer}_qkv"), f"layer {s.layer} q/k/v input"))
                for s in find_sites(captured.gm)]
    finally:
        Pipeline([RemoveObservers()])(captured)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``labels[:, t+1]`` from ``logits[:, t]``.

    The shift happens here (and in :func:`head_loss`, through :func:`_shifted`) and nowhere else. Positions whose
    label is -100 do not count (e.g. prompt tokens when only answers are supervised).
    """
    shifted = _shifted(labels, logits)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1), ignore_index=-100
    )


LOGIT_CHUNK_BYTES = 16 * 2**20  # float32 logits per chunk of head_loss (SmolLM2, V = 49152: 85 positions)


def head_loss(hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor, *,
              chunk_bytes: int = LOGIT_CHUNK_BYTES) -> torch.Tensor:
    """``next_token_loss(linear(hidden, head), labels)`` for hidden states [B, S, E] and an LM head [V, E], without
    the [B, S, V] logits: sum_c CE_sum(linear(h_c, head), labels_c) / #scored over chunks c of
    p = chunk_bytes / (4 V) positions, each chunk a non-reentrant checkpoint (its logits are made again in
    backward). So forward and backward hold one chunk's float32 logits, log-softmax and their gradients instead of
    four [B, S, V] tensors (SmolLM2, S = 256: 16 MB instead of 0.2 GB) for one more head matmul per window."""
    shifted = _shifted(labels, hidden).reshape(-1)
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    step = max(1, chunk_bytes // (4 * head.shape[0]))
    total = sum(checkpoint(_chunk_loss, flat[i:i + step], head, shifted[i:i + step], use_reentrant=False)
                for i in range(0, len(flat), step))
    return total / (shifted != -100).sum()


def _chunk_loss(hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, head).float()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def _shifted(labels: torch.Tensor, per_position: torch.Tensor) -> torch.Tensor:
    """``labels[:, 1:]`` on ``per_position``'s device after checking it against its [B, S, ...] shape."""
    if per_position.shape[:2] != labels.shape:
        raise WsvdError(f"labels {tuple(labels.shape)} do not match logits {tuple(per_position.shape[:2])}")
    shifted = labels[:, 1:].to(per_position.device)
    if not (shifted != -100).any():
        raise WsvdError("every label is masked (-100): nothing to compute a loss on")
    return shifted


def collect_gradients(
    captured: CapturedGraph,
    samples: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor] | dict],
    targets: Sequence[str],
    *,
    on_sample: Callable[[dict[str, torch.Tensor]], None] | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of the next-token loss w.r.t. the weights named in ``targets``.

    Each sample is one sequence: int64 ids [S] (labels = ids), a pair (ids [S], labels [S]), or an
    image-text dict (graph kwargs with batch 1 and ``labels`` [1, S]).
    Returns the diagonal Fisher ``F[name] = mean_samples(g * g)`` (float32, shaped like the
    weight); ``on_sample`` receives each sample's gradients ``{name: g}`` before reduction.
    """
    if captured.kind != "forward":
        raise WsvdError("gradients need the full-sequence graph: capture it with capture_forward()")
    gm = captured.gm
    params = dict(gm.named_parameters())
    missing = [t for t in targets if t not in params]
    if missing:
        raise WsvdError(f"no parameter named {missing[0]!r} in the captured graph: pass weight targets from the sites")
    saved = {name: p.requires_grad for name, p in params.items()}
    run, head = LayerCheckpointed(gm), logits_head(gm)
    fisher = {t: torch.zeros_like(params[t], dtype=torch.float32) for t in targets}
    count = 0
    try:
        for name, p in params.items():
            p.requires_grad_(name in fisher)
        for sample in tqdm(list(samples), desc="per-sample gradients", disable=not progress):
            if isinstance(sample, dict):
                kwargs, labels = split_batch(sample, captured.device)
            else:
                ids, labels = sample if isinstance(sample, tuple) else (sample, sample)
                kwargs, labels = {"input_ids": ids[None].to(captured.device)}, labels[None]
            with torch.enable_grad():
                if head is None:
                    loss = next_token_loss(run(**kwargs), labels)
                else:  # the graph ends in its LM head: the loss from the head's input, chunk by chunk
                    hidden, weight = run.arguments_of(head, **kwargs)[:2]  # (h, W) or (h, W, None)
                    loss = head_loss(hidden, weight, labels)
                grads = torch.autograd.grad(loss, [params[t] for t in targets])
            grads = dict(zip(targets, grads))
            if on_sample is not None:
                on_sample(grads)
            for t, g in grads.items():
                fisher[t] += g.float().square()
            count += 1
            del grads
            trim_heap()
    finally:
        for name, p in params.items():
            p.requires_grad_(saved[name])
    if count == 0:
        raise WsvdError("no calibration samples were given for gradient collection")
    return {t: f / count for t, f in fisher.items()}

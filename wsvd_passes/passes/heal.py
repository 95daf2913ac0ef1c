"""Healing: train the low-rank factors to match the dense model: its next-token distributions (end to end), or
each layer's outputs (streamed compression).

After factorisation (and, for quantised recipes, after rotations, local QAT and fake quantisation),
every factored q/k/v latent of the graph has a down-projection D [n r, E] and up-projections
U_p [n d_p, n r] (per-head factors: n heads, block-diagonal U, ranks padded to r with zeros; joint
and per-projection factors: n = 1). Healing trains float32 masters of the diagonal blocks
D_h [r, E], U_p,h [d_p, r] (and, for recipes with S2, a per-head orthogonal R_h [r, r], Cayley
parametrised, started at the identity) to minimise, over calibration windows,

    L = mean_t KL( p_dense(. | x_<=t) || p_compressed(. | x_<=t) )

with every other weight frozen. The graph sees

    D = blockdiag-stack_h( R_h (M_h * D_h) ),   U_p = blockdiag_h( (M'_h * U_p,h) R_h^T ),
    then Q(D), Q(U_p)

where M_h, M'_h keep head h's first r_h latent channels (the padding gets no gradient and stays
exactly zero) and Q is the deployment weight quantiser (per-row RTN, clip ratio searched again
every ``clip_every`` steps) with a straight-through gradient; the graph's activation quantisers
(latents per token per head included) are switched to their straight-through form while training.
So the loss is the loss of the quantised graph that is deployed.

Adam on the masters (S2 at its own rate), the learning rate warmed up linearly over the first
``warmup`` fraction of the steps and then decayed by a cosine (:func:`lr_factor`); ``batch_size``
windows per step, reshuffled each epoch. The dense model's side is computed once per training window and
kept: each step runs the compressed graph forward and backward only; the backward reaches the masters through
the frozen weights (no weight gradients).

A slice of the calibration windows (``val_fraction``, at least one, at most ``max_val``: each evaluation costs two
forwards per held-back window) is held back: the validation loss is measured on the written (deployed) graph every
``eval_every`` steps (default max(10, steps / 6)), the best state is kept, and training stops after ``patience``
evaluations without improvement. The calibration loss is measured before and after on the first ``score_windows``
training windows; the report also has the mean training loss between evaluations (``train_history``). Evaluation
data never reaches this pass: it is given the calibration windows only.

The loss is the pass's objective:

- :class:`LogitKL` (whole-model compression): L above, on the whole graph's logits. The dense distributions
  of the training windows are kept as their top k tokens plus the tail's mass (n x S x (6 k + 4) bytes for
  V <= 65536, not the n x S x V x 4 of the float logits), so the training loss is the top-k + tail KL, a lower
  bound of L (equal at k = V; ``teacher_topk=0`` keeps the exact logits). The calibration and validation
  scores, hence early stopping, are the exact L: the dense logits of the scored windows are recomputed.
- :class:`LayerOutputError` (streamed compression, one decoder layer's graph at a time): the layer's
  relative output error against the dense layer on the dense layer's inputs x,

      e = sum ||f_c(x) - f(x)||^2 / sum ||f(x) - x||^2

  (f(x) - x is the dense layer's update of the residual stream, so e = 1 is an error as large as
  the update). Layer-local: it cannot see the logits, and each layer is healed on dense inputs,
  not on the compressed layers below it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time

import torch
import torch.nn.functional as F
from torch.fx import GraphModule
from tqdm.auto import tqdm

from ..algorithms.lowrank import PROJECTIONS
from ..algorithms.quantize import fake_quant_activation, fake_quant_weight, quantize_weight, search_weight_clip
from ..compression.calibration import split_batch
from ..errors import WsvdError
from ..eval.evaluation import MemoLogits, evaluate
from ..eval.topk import TopK, kl_topk, top_k
from ..graph.capture import CapturedGraph
from ..graph.factor_spec import factor_spec, from_head_blocks, head_blocks
from ..graph.graph_utils import is_call, tensor_attr
from ..graph.pipeline import GraphPass
from ..graph.quant_spec import quantized_weights
from ..graph.sites import AttentionSite
from .qat import Rotation


@dataclasses.dataclass
class _Latent:
    """One trainable latent: masters of D [n, r, E] and of each up-projection [n, d_p, r]."""

    down: str  # get_attr target of D [n r, E]
    ups: list[str]  # get_attr targets of the up-projections reading this latent
    ranks: list[int]  # kept rank per block
    down_master: torch.Tensor
    up_masters: list[torch.Tensor]
    rotation: Rotation | None = None

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank masks [n, r, 1] (rows of D) and [n, 1, r] (columns of U)."""
        r = self.down_master.shape[1]
        keep = (torch.arange(r, device=self.down_master.device) < torch.tensor(self.ranks, device=self.down_master.device)[:, None])
        keep = keep.to(self.down_master.dtype)
        return keep[:, :, None], keep[:, None, :]

    def parameters(self) -> list[torch.Tensor]:
        return [self.down_master, *self.up_masters]

    def effective(self) -> dict[str, torch.Tensor]:
        """The float factors the graph should hold (before the weight quantiser): target -> tensor."""
        mask_d, mask_u = self.masks()
        down, ups = self.down_master * mask_d, [u * mask_u for u in self.up_masters]
        if self.rotation is not None:
            R = self.rotation.weight
            down, ups = R @ down, [u @ R.transpose(-1, -2) for u in ups]
        out = {self.down: down.flatten(0, 1)}
        out.update({t: from_head_blocks(u) for t, u in zip(self.ups, ups)})
        return out


def _latents(gm: GraphModule, sites: list[AttentionSite], s2: bool) -> list[_Latent]:
    """The factored latents of the graph with float32 masters of their diagonal blocks."""
    latents: dict[str, _Latent] = {}
    for site in sites:
        for p in PROJECTIONS:
            proj = getattr(site, f"{p}_proj")
            if not proj.factored:
                raise WsvdError(f"layer {site.layer} {p}: not factored; healing trains low-rank factors (use a factor recipe)")
            if proj.up is None:
                raise WsvdError(f"layer {site.layer} {p}: its up-projection is folded away; heal before the latent-KV rewrite")
            spec = factor_spec(proj.node)
            U = tensor_attr(gm, proj.up).detach().float()
            n, width = spec.blocks, spec.width
            ups = head_blocks(U, n)
            if proj.down not in latents:
                D = tensor_attr(gm, proj.down).detach().float()
                latents[proj.down] = _Latent(proj.down, [], list(spec.ranks), D.reshape(n, width, -1).clone(), [])
                if s2 and spec.per_head:
                    eye = torch.eye(width, device=D.device).expand(n, width, width).clone()
                    latents[proj.down].rotation = Rotation(eye, list(spec.ranks))
            latent = latents[proj.down]
            latent.ups.append(proj.up)
            latent.up_masters.append(ups.clone())
    for latent in latents.values():
        for t in latent.parameters():
            t.requires_grad_(True)
    return list(latents.values())


TEACHER_TOPK = 256  # tokens of the dense teacher kept per position for training (README, Healing: measured on SmolLM2)


class LogitKL:
    """KL(dense || compressed) of the next-token distributions of the whole graph (token ids [B, S] or image-text
    kwargs -> logits [B, S, V]); ``reference`` is the uncompressed capture.

    The teacher is computed once per training window and kept as its top k = ``teacher_topk`` tokens and tail
    (:mod:`wsvd_passes.eval.topk`): n windows x S x (k (4 + b) + 4) bytes, b = 2 for V <= 65536 else 4 (SmolLM2-135M,
    56 windows of 256, k = 256: 22 MB), and the training loss is KL_k <= KL. ``teacher_topk=0`` keeps the exact
    float32 logits instead, n x S x V x 4 bytes (3.2 GB for SmolLM2's 64 windows), scoring sharing them.
    Scores (calibration and validation, hence early stopping) are always the exact KL: with k > 0 the dense
    logits of the scored windows are recomputed at each score, [batch, S, V] float32 at a time: one dense forward per
    scored window per score (SmolLM2, 30 steps: 8 calibration windows twice and 8 validation windows 4 times, 48
    dense window forwards instead of 16 once each: the extra 32 cost about 5 training steps of 2 windows).
    """

    name = "kl"

    def __init__(self, reference: CapturedGraph, teacher_topk: int = TEACHER_TOPK):
        if teacher_topk < 0:
            raise WsvdError(f"teacher_topk {teacher_topk} must be at least 0 (0: keep the exact dense logits)")
        self.reference, self.settings = reference, {"teacher_topk": teacher_topk}
        dense = functools.partial(_call, reference.gm)
        self.teacher = MemoLogits(lambda x: top_k(dense(x), teacher_topk)) if teacher_topk else MemoLogits(dense)
        self.exact = dense if teacher_topk else self.teacher  # what the scores compare with

    def loss(self, gm: GraphModule, tensors: dict[str, torch.Tensor], batch, device: torch.device) -> torch.Tensor:
        kwargs, labels = split_batch(batch, device)
        inputs = kwargs if isinstance(batch, dict) else kwargs["input_ids"]
        with torch.no_grad():
            ref = self.teacher(inputs)
        return kl_loss(ref, _call_with(gm, tensors, inputs), labels)

    def scorer(self, device: torch.device, batch_size: int):
        """``score(gm, data)``: the mean KL of ``gm`` over ``data``."""
        return lambda gm, data: evaluate(lambda x: _call(gm, x), data, reference=self.exact, progress=False,
                                         device=device, batch_size=batch_size).kl


class LayerOutputError:
    """The relative output error of one decoder layer's graph ``gm(hidden_states [1, S, E]) -> [1, S, E]`` against
    the dense layer, e = sum ||f_c(x) - y||^2 / sum ||y - x||^2, over samples ``{"hidden_states": x, "target": y}``
    (the dense layer's input and output, in the graph's basis: rotated by S1 when the recipe rotates; and the
    graph's other inputs, e.g. multimodal-RoPE ``position_ids``)."""

    name = "layer_output_error"
    settings: dict = {}

    def loss(self, gm: GraphModule, tensors: dict[str, torch.Tensor], batch, device: torch.device) -> torch.Tensor:
        error, energy = self._terms(gm, tensors, batch, device)
        return error / energy

    def scorer(self, device: torch.device, batch_size: int):
        """``score(gm, data)``: e of ``gm`` over all of ``data`` (sums of errors over sums of updates)."""
        def score(gm: GraphModule, data) -> float:
            with torch.no_grad():
                terms = [self._terms(gm, {}, sample, device) for sample in data]
            return float(sum(t[0] for t in terms) / sum(t[1] for t in terms))
        return score

    @staticmethod
    def _terms(gm, tensors, sample, device) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = sample["hidden_states"].to(device), sample["target"].to(device)
        kwargs = {k: v.to(device) for k, v in sample.items() if k != "target"}
        out = torch.func.functional_call(gm, tensors, kwargs=kwargs, strict=False, tie_weights=False)
        return (out.float() - y.float()).square().sum(), (y.float() - x.float()).square().sum()


def kl_loss(ref: torch.Tensor | TopK, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over scored positions (t < S-1, label t+1 != -100) of KL(p_ref || p), float32, differentiable in ``logits``:
    exact for reference logits [B, S, V], KL_k (:func:`~wsvd_passes.eval.topk.kl_topk`) for a top-k reference."""
    keep = (labels[:, 1:].to(logits.device) != -100).float()  # [B, S-1]; a mask, not an index: no scatter in the backward
    logp = F.log_softmax(logits[:, :-1].float(), -1)
    if isinstance(ref, TopK):
        kl = kl_topk(TopK(*(t[:, :-1] for t in ref)), logp)
    else:
        p = F.log_softmax(ref[:, :-1].float(), -1)
        kl = (p.exp() * (p - logp)).sum(-1)
    return (kl * keep).sum() / keep.sum()


def _call(gm: torch.nn.Module, batch) -> torch.Tensor:
    """Logits of ``gm`` for token ids [B, S] or image-text graph kwargs."""
    return gm(**batch) if isinstance(batch, dict) else gm(input_ids=batch)


class Heal(GraphPass):
    """Train the factors of every factored q/k/v (and S2 with ``s2``) on ``objective``'s loss.

    ``objective`` is :class:`LogitKL` (``windows``: the calibration windows, int64 [n, S] or image-text
    samples) or :class:`LayerOutputError` (``windows``: its samples); ``weight_bits`` < 16 re-quantises the
    factors as the deployment quantiser does. ``report`` holds the objective, its calibration and validation
    values before/after, the steps taken and the time.
    """

    def __init__(self, objective: LogitKL | LayerOutputError, windows, *, steps: int, lr: float, weight_bits: int = 16,
                 s2: bool = False, s2_lr: float = 1e-3, warmup: float = 0.1, batch_size: int = 2,
                 val_fraction: float = 0.125, max_val: int = 8, eval_every: int | None = None, patience: int = 3,
                 clip_every: int = 10, score_windows: int = 8, seed: int = 0, progress: bool = False):
        if steps < 0:
            raise WsvdError(f"heal steps {steps} must be at least 0")
        if len(windows) < 2:
            raise WsvdError(f"healing needs at least 2 calibration windows (one held back for validation), got {len(windows)}")
        self.objective, self.windows = objective, windows
        self.steps, self.lr, self.weight_bits, self.s2, self.s2_lr = steps, lr, weight_bits, s2, s2_lr
        self.warmup = warmup
        eval_every = max(10, steps // 6) if eval_every is None else eval_every  # None: at most about 6 evaluations
        self.batch_size, self.eval_every, self.patience, self.clip_every = batch_size, eval_every, patience, clip_every
        if not isinstance(windows, torch.Tensor):
            self.batch_size = 1  # image-text samples differ in length, layer samples are one window: one per step
        self.score_windows, self.seed, self.progress = score_windows, seed, progress
        n_val = max(1, min(len(windows) - 1, max_val, round(len(windows) * val_fraction)))
        self.train, self.val = windows[: len(windows) - n_val], windows[len(windows) - n_val:]
        self.report: dict = {}

    def transform(self, gm: GraphModule, sites: list[AttentionSite]) -> bool:
        start = time.perf_counter()
        latents = _latents(gm, sites, self.s2)
        device = latents[0].down_master.device
        score = functools.partial(self.objective.scorer(device, self.batch_size * 4), gm)
        scored = self.train[: self.score_windows]
        calib_before = score(scored)
        best = (score(self.val), 0, self._snapshot(latents))
        val_before, history, stale, step = best[0], [(0, best[0])], 0, 0
        train_history, losses = [], []  # (step, mean training loss of the steps since the previous evaluation)
        frozen = {name: p.requires_grad for name, p in gm.named_parameters()}
        groups = [{"params": [t for lat in latents for t in lat.parameters()], "lr": self.lr}]
        rotations = [p for lat in latents if lat.rotation is not None for p in lat.rotation.parameters()]
        if rotations:
            groups.append({"params": rotations, "lr": self.s2_lr})
        opt = torch.optim.Adam(groups)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, steps=self.steps, warmup=self.warmup))
        order = self._order()
        clips: dict[str, torch.Tensor] = {}
        straight = _StraightThrough(gm)
        try:
            for p in gm.parameters():
                p.requires_grad_(False)
            straight.set(True)
            for step in tqdm(range(1, self.steps + 1), desc="healing", unit="step", disable=not self.progress, leave=False):
                if (step - 1) % self.clip_every == 0:
                    clips = self._clips(latents)
                batch = self._batch(order, step - 1)
                with torch.enable_grad():
                    loss = self.objective.loss(gm, self._quantised(gm, latents, clips), batch, device)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                schedule.step()
                losses.append(loss.item())
                if step % self.eval_every == 0 or step == self.steps:
                    train_history.append((step, sum(losses) / len(losses)))
                    losses = []
                    straight.set(False)  # the validation KL is the deployed graph's
                    self._write(gm, latents)
                    val = score(self.val)
                    straight.set(True)
                    history.append((step, val))
                    if val < best[0]:
                        best, stale = (val, step, self._snapshot(latents)), 0
                    else:
                        stale += 1
                        if stale >= self.patience:
                            break
        finally:
            straight.set(False)
            for name, p in gm.named_parameters():
                p.requires_grad_(frozen[name])
        self._restore(latents, best[2])
        self._write(gm, latents)
        self.report.update({  # in place: holders of the pass's report see it filled
            "objective": self.objective.name, **self.objective.settings, "steps": self.steps, "steps_taken": step,
            "best_step": best[1],
            "lr": self.lr, "warmup": self.warmup, "s2": bool(rotations), "batch_size": self.batch_size, "train_windows": len(self.train),
            "val_windows": len(self.val), "calib_windows": len(scored), "calib_before": calib_before,
            "calib_after": score(scored), "val_before": val_before, "val_after": best[0], "val_history": history,
            "train_history": train_history,
            "seconds": round(time.perf_counter() - start, 1),
        })
        return True

    def _order(self) -> list[int]:
        """Training windows, reshuffled each epoch (seeded), as one index stream."""
        g = torch.Generator().manual_seed(self.seed)
        epochs = math.ceil(self.steps * self.batch_size / len(self.train)) + 1
        return [int(i) for _ in range(epochs) for i in torch.randperm(len(self.train), generator=g)]

    def _batch(self, order: list[int], step: int):
        idx = order[step * self.batch_size:(step + 1) * self.batch_size]
        if isinstance(self.train, torch.Tensor):
            return self.train[torch.tensor(idx)]
        return self.train[idx[0]]

    def _clips(self, latents: list[_Latent]) -> dict[str, torch.Tensor]:
        if self.weight_bits >= 16:
            return {}
        with torch.no_grad():
            return {t: search_weight_clip(w, self.weight_bits) for lat in latents for t, w in lat.effective().items()}

    def _quantised(self, gm: GraphModule, latents: list[_Latent], clips: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """target -> Q(effective factor) in the graph's dtype, straight-through gradient (the identity at 16 bits)."""
        return {t: fake_quant_weight(w, self.weight_bits, clip_ratio=clips.get(t), ste=True).to(tensor_attr(gm, t).dtype)
                for lat in latents for t, w in lat.effective().items()}

    def _write(self, gm: GraphModule, latents: list[_Latent]) -> None:
        """Put the deployed factors (clip searched afresh, quantised) into the graph's own tensors; a factor
        that FakeQuantize recorded gets its codes * scale and its scale buffer rewritten, so its
        :class:`~wsvd_passes.graph.quant_spec.QuantSpec` still holds (the packed artifact stores the codes)."""
        recorded, clips = quantized_weights(gm), self._clips(latents)
        with torch.no_grad():
            for lat in latents:
                for t, w in lat.effective().items():
                    if t in recorded:
                        bits, scale_target = recorded[t]
                        codes, scale = quantize_weight(w, bits, clip_ratio=clips.get(t))
                        tensor_attr(gm, scale_target).copy_(scale)
                        w = codes * scale[:, None]
                    else:
                        w = fake_quant_weight(w, self.weight_bits, clip_ratio=clips.get(t))
                    tensor_attr(gm, t).copy_(w)

    @staticmethod
    def _snapshot(latents: list[_Latent]) -> list:
        return [([t.detach().clone() for t in lat.parameters()],
                 copy.deepcopy(lat.rotation.state_dict()) if lat.rotation is not None else None) for lat in latents]

    @staticmethod
    def _restore(latents: list[_Latent], snapshot: list) -> None:
        with torch.no_grad():
            for lat, (tensors, rotation) in zip(latents, snapshot):
                for t, saved in zip(lat.parameters(), tensors):
                    t.copy_(saved)
                if rotation is not None:
                    lat.rotation.load_state_dict(rotation)


def lr_factor(i: int, *, steps: int, warmup: float) -> float:
    """The learning rate of step i + 1 (i = 0 .. steps - 1) over the peak: linear warmup over the first
    w = max(1, round(warmup * steps)) steps, then a cosine to zero,

        f(i) = (i + 1) / w                                  for i < w
        f(i) = (1 + cos(pi (i + 1 - w) / (steps + 1 - w))) / 2   otherwise (the last step still moves)."""
    w = max(1, round(warmup * steps))
    if i < w:
        return (i + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (i + 1 - w) / (steps + 1 - w)))


def _call_with(gm: GraphModule, tensors: dict[str, torch.Tensor], inputs) -> torch.Tensor:
    """Logits of ``gm`` with the named parameters replaced by ``tensors`` (differentiable in them)."""
    return torch.func.functional_call(gm, tensors, kwargs=inputs if isinstance(inputs, dict) else {"input_ids": inputs},
                                      strict=False, tie_weights=False)


class _StraightThrough:
    """Switches the graph's activation quantisers between their deployed form and a straight-through one
    (``ste=True``: same value up to rounding, identity gradient) for training."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.nodes = [n for n in gm.graph.nodes if is_call(n, fake_quant_activation)]

    def set(self, value: bool) -> None:
        if not self.nodes or all(n.kwargs.get("ste", False) == value for n in self.nodes):
            return
        for n in self.nodes:  # off: the kwarg is dropped again, so the graph is the one FakeQuantize built
            n.kwargs = {**{k: v for k, v in n.kwargs.items() if k != "ste"}, **({"ste": True} if value else {})}
        self.gm.recompile()

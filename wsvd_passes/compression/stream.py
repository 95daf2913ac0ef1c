"""Streamed compression: one decoder layer in memory at a time (``wsvd compress --stream``).

The model is built on the meta device; a decoder layer's weights are read from the checkpoint's
safetensors (memory-mapped, :class:`~wsvd_passes.compression.checkpoint.Checkpoint`) only while that layer is processed, then freed.
Each layer is exported as its own graph ``gm(hidden_states [1, S, E]) -> [1, S, E]`` (one window at a time: static
shapes for text windows, any S for image-text samples; causal mask and RoPE computed inside, parameter names as in the whole-model capture, ``gm.meta`` saying
which layer it is and that its input is the residual stream), so
:func:`~wsvd_passes.graph.sites.find_sites` and the recipe's passes run on it unchanged. The embedding,
final norm and LM head form one more graph, the model with no layers (:func:`capture_top`), which
the same passes rotate and quantise. For n calibration windows of S tokens and L layers:

1. forward, bottom up: h_0 = embed(ids) for text windows; for a VLM, h_0 = the decoder's ``inputs_embeds``,
   made once per image-text sample by the eager front (:func:`front_samples`: the model without its decoder
   layers runs its vision tower, projector and merge of image features into the token embeddings, as the
   whole-model mode does); for layer i the Gram statistics of its q/k/v input and
   o_proj input, its SVD groups, and h_{i+1} = layer_i(h_i). The inputs h_i (n x [1, S, E]) wait on disk
   (:class:`~wsvd_passes.compression.layer_store.LayerStore`, in ``offload_dir``) for step 2.
2. backward, top down, one window at a time: the next-token loss and g_L = dL/dh_L through the
   final norm and LM head; then for each layer its forward recomputed from h_i under autograd
   gives the window's gradients of q/k/v (rank importance, Fisher) and g_i = dL/dh_i. Recipes
   with local QAT also need the Fisher in the rotated basis: :class:`~wsvd_passes.passes.qat.RotatedTargets`
   maps the same per-window gradients there, as in the whole-model mode.
3. ranks allocated globally under rho1 and/or the cache budget rho2 (:func:`~wsvd_passes.compression.compress.allocate_ranks`, unchanged);
   then per layer the recipe's passes (:func:`~wsvd_passes.compression.compress.recipe_passes`: factorise,
   rotate, local QAT, fake-quantise) and its new tensors written packed as a shard
   (:func:`~wsvd_passes.artifacts.artifact.packed_changes`); then the no-layer graph's.

Every pass is local to a layer except the residual rotation S1, which is global but fixed
(seeded): a layer graph's input arrives in the rotated basis, the embedding and LM head are
rotated in the no-layer graph. The result equals the whole-model compression up to float
rounding (same ranks, factors and quantisers). Recipes that heal do it layer-locally here
(:class:`~wsvd_passes.passes.heal.LayerOutputError`: each compressed layer's output against the dense
layer's on the stored inputs h_i, targets h_{i+1}, both rotated by S1 when the recipe rotates),
not end to end on the logits as the whole-model mode does.

VLMs stream (LLaVA, LLaVA-Next, Idefics3/SmolVLM, Qwen2-VL: tested on tiny-llava and tiny-qwen2-vl): their layer
graphs are named as the whole-model decoder capture names them (``decoder.layers.{i}``); a multimodal-RoPE model's
layer graphs also take each sample's (t, h, w) ``position_ids [3, 1, S]`` from the eager front, as its whole-model
graph does; the no-layer graph is ``inputs_embeds (, position_ids) -> logits`` through the final norm and LM head, and
a rotating recipe rotates the incoming embeddings there (``x -> x S1``, as in the whole-model mode; layer graphs are
fed ``h S1``). Checkpoints whose tensors transformers converts on loading (not a plain rename: fused MoE experts,
e.g. Qwen3-VL-MoE) are refused in one line: compress them with ``--no-stream``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..algorithms.hadamard import random_hadamard
from ..algorithms.lowrank import PROJECTIONS, Group
from ..algorithms.quantize import Bits
from ..algorithms.rank_allocation import ImportanceAccumulator, above_break_even, achieved_rho1
from ..artifacts.artifact import digests, library_version, packed_changes, save_streamed, shard_metadata, write_shard
from ..errors import WsvdError
from ..graph.capture import CapturedGraph, capture_forward, unlift
from ..graph.graph_utils import FIRST_LAYER, NO_LAYERS, RESIDUAL_INPUT, tensor_attr
from ..graph.pipeline import GraphPass, Pipeline
from ..graph.sites import AttentionSite, find_sites
from ..passes.heal import Heal, LayerOutputError
from ..passes.qat import LocalQAT, QATTarget, RotatedTargets
from ..passes.rotate import S1_SEED, qkv_bases
from .calibration import collect_input_stats, head_loss, split_batch
from .checkpoint import Checkpoint
from .compress import Calibration, FactorReport, allocate_ranks, factor_plan, layer_groups, recipe_passes
from .layer_store import LayerStore, StreamedCalibration, graph_inputs, load_calibration, save_calibration
from .memory import bound_heap, release_memory
from .recipes import Recipe


def _place(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` under ``root``, creating empty modules on the way, so that the graph
    names its tensors as the whole-model capture does."""
    *owners, leaf = path.split(".")
    for name in owners:
        if not hasattr(root, name):
            root.add_module(name, torch.nn.Module())
        root = getattr(root, name)
    root.add_module(leaf, module)


class LayerForward(torch.nn.Module):
    """One decoder layer as ``hidden_states [B, S, E] (, position_ids [3, B, S]) -> [B, S, E]`` with the model's causal
    mask and RoPE, at the path the whole-model capture gives it (``model.model.layers.{i}``, ``decoder.layers.{i}``).
    RoPE is at positions 0..S-1, or at a multimodal-RoPE model's (t, h, w) ``position_ids`` (Qwen2-VL)."""

    def __init__(self, checkpoint: Checkpoint, index: int):
        super().__init__()
        self.config, decoder = checkpoint.text_config, checkpoint.skeleton.get_decoder()
        self.layer = checkpoint.graph_paths[f"{checkpoint.decoder}.layers.{index}"]
        self.rotary = checkpoint.graph_paths[f"{checkpoint.decoder}.rotary_emb"]
        _place(self, self.layer, checkpoint.module(f"{checkpoint.decoder}.layers.{index}"))
        _place(self, self.rotary, type(decoder.rotary_emb)(config=self.config))  # its buffers, built on the CPU

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        positions = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
        # (config, inputs_embeds, attention_mask, no cache, position_ids) by position: the cache argument is
        # ``past_key_values`` up to transformers 5.1x (the device image's 5.17) and ``cache`` in 5.2x
        mask = create_causal_mask(self.config, hidden_states, None, None, positions)
        rope = self.get_submodule(self.rotary)(hidden_states, position_ids=positions if position_ids is None else position_ids)
        return self.get_submodule(self.layer)(hidden_states, attention_mask=mask, position_ids=positions,
                                              position_embeddings=rope)


def capture_layer(checkpoint: Checkpoint, index: int, seq_len: int | None = 17) -> CapturedGraph:
    """Export decoder layer ``index`` (its weights loaded now) for one window of ``seq_len`` tokens (the calibration
    length; the compression step only edits the graph, so its default length is arbitrary), or of any length for
    ``seq_len=None`` (image-text samples differ in length).

    Static shapes where they do: torch.export with dynamic dims keeps each export's ShapeEnv and FakeTensorMode
    alive for the rest of the process (torch 2.13; measured: one more of each per export, also with a bare
    ``nn.Linear``), so memory grew with depth (measured at width 1024: 16 layers over 2 cost 38 MB more peak RSS,
    16 MB with static shapes); the layer graphs are run one window at a time."""
    module, S = LayerForward(checkpoint, index), seq_len or 17
    example = {"hidden_states": torch.zeros(1, S, checkpoint.text_config.hidden_size, dtype=checkpoint.dtype)}
    if checkpoint.mrope:  # (t, h, w) positions: a graph input, as in the whole-model capture
        example["position_ids"] = torch.arange(S).expand(3, 1, S).contiguous()
    dynamic = None
    if not seq_len:
        seq = torch.export.Dim("seq", min=2, max=int(getattr(checkpoint.text_config, "max_position_embeddings", 4096)))
        dynamic = {"hidden_states": {1: seq}, **({"position_ids": {2: seq}} if checkpoint.mrope else {})}
    with torch.no_grad():
        ep = torch.export.export(module, (), kwargs=example, dynamic_shapes=dynamic, strict=False)
    gm = unlift(ep)
    gm.meta.update({FIRST_LAYER: index, RESIDUAL_INPUT: True})
    return CapturedGraph(gm, "forward", example, dynamic, checkpoint.text_config)


def capture_top(checkpoint: Checkpoint) -> CapturedGraph:
    """The model with no decoder layers, captured as the whole model is (``input_ids -> logits`` through the
    embedding, the final norm and the LM head; a VLM's ``inputs_embeds -> logits`` through the final norm and the
    LM head): where the recipe's passes rotate and quantise those, as in the whole graph."""
    captured = capture_forward(checkpoint.without_layers())
    captured.gm.meta[NO_LAYERS] = True
    return captured


def unstreamable(recipe: Recipe, bits: Bits | None = None) -> str | None:
    """Why ``recipe`` (at ``bits``) cannot be compressed layer by layer (one line naming the fix), or None when it can."""
    if not recipe.factor:
        return (f"recipe {recipe.name} has no low-rank factors: --stream runs the low-rank recipes (wsvd, wsvd-noq, "
                "qsvd, svd-llm, ...); compress it without --stream")
    layers = [name for name in (bits.a8 if bits else ()) if name.startswith("layer")]
    if layers:  # a layer graph sees one layer: it cannot resolve layer-1 nor check that the layer exists
        return (f"--bits {bits.name}: 8-bit exceptions by layer ({layers[0]}) are whole-model only for now: compress with "
                "--no-stream, or name input kinds (+down_proj, ...)")
    return None


def calibration_inputs(checkpoint: Checkpoint, data: torch.Tensor | list[dict]
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
    """(h_0 [1, S_n, E], labels [1, S_n], multimodal-RoPE position ids [3, 1, S_n] or None) per sample of ``data``:
    text windows (token ids [n, S], embedded here; labels = ids) or image-text samples (``inputs_embeds`` and
    ``position_ids`` from the eager front, :func:`front_samples`, and labels)."""
    if torch.is_tensor(data):
        table = checkpoint.tensor(f"{checkpoint.embedding}.weight")
        return [torch.nn.functional.embedding(w, table) for w in data.split(1)], list(data.split(1)), None
    samples = [split_batch(sample) for sample in data]
    positions = [kwargs["position_ids"] for kwargs, _ in samples] if checkpoint.mrope else None
    return ([kwargs["inputs_embeds"].to(checkpoint.dtype) for kwargs, _ in samples], [labels for _, labels in samples],
            positions)


def front_samples(checkpoint: Checkpoint, items: list) -> list[dict]:
    """The eager front of a VLM, run once per image-text item (:class:`~wsvd_passes.eval.mm_data.MMItem`): the model
    without its decoder layers (vision tower, projector, embedding; :meth:`Checkpoint.without_layers`) and the
    checkpoint's processor make each item's labelled sample (``inputs_embeds`` = h_0, ``labels``), exactly as the
    whole-model mode does (:func:`~wsvd_passes.eval.mm_data.image_text_samples`)."""
    from ..eval.mm_data import image_text_samples
    from ..models.registry import LoadedModel
    from ..models.vlm import load_processor

    processor = load_processor(checkpoint.path, checkpoint.config.model_type)
    front = LoadedModel(str(checkpoint.path), checkpoint.without_layers(), processor.tokenizer, processor)
    return image_text_samples(front, items)


def _seq_len(hidden: list[torch.Tensor]) -> int | None:
    """The length the layer graphs are captured for: the samples' common length, or None (any) when they differ."""
    lengths = {h.shape[1] for h in hidden}
    return lengths.pop() if len(lengths) == 1 else None


def calibrate_streamed(checkpoint: Checkpoint, data: torch.Tensor | list[dict], recipe: Recipe, work_dir: str | Path,
                       *, grad_samples: int | None = None, progress: bool = True) -> StreamedCalibration:
    """What :func:`~wsvd_passes.compression.compress.calibrate` measures, layer by layer (steps 1 and 2 above), on
    ``data`` (:func:`calibration_inputs`)."""
    if len(data) < 2:
        raise WsvdError(f"{len(data)} calibration window(s) are too few: give at least 2 (the paper uses 256)")
    if (refusal := unstreamable(recipe)) is not None:
        raise WsvdError(refusal)
    store = LayerStore(work_dir)
    key = (recipe.granularity, recipe.scaling)
    with torch.no_grad():
        hidden, labels, positions = calibration_inputs(checkpoint, data)
    store.put_positions(positions)
    groups, heads, layers = [], None, checkpoint.text_config.num_hidden_layers
    for i in tqdm(range(layers), desc="streamed statistics", unit="layer", disable=not progress):
        captured = capture_layer(checkpoint, i, _seq_len(hidden))
        (site,) = find_sites(captured.gm)
        heads = heads or {k: getattr(site, k) for k in ("n_heads", "n_kv_heads", "head_dim", "hidden_size")}
        inputs = graph_inputs(hidden, positions)
        stats = collect_input_stats(captured, [{**kwargs, "labels": None} for kwargs in inputs], progress=False)[0]
        store.put_stats(i, stats)
        store.put_hidden(i, hidden)
        groups += [g.shapes_only() for g in layer_groups(site, _qkv_weights(captured, site), stats, [recipe])[key]]
        with torch.no_grad():
            hidden = [captured.gm(**kwargs) for kwargs in inputs]
        del captured, site, stats, inputs
        release_memory()
    store.put_hidden(layers, hidden)  # the last layer's output
    n = len(hidden) if grad_samples is None else grad_samples
    scores = _streamed_gradients(checkpoint, labels[:n], hidden[:n], recipe, store, progress)
    return StreamedCalibration(heads, layers, groups, scores, len(labels[:n]), store)


def _qkv_weights(captured: CapturedGraph, site) -> dict[str, torch.Tensor]:
    return {p: tensor_attr(captured.gm, getattr(site, f"{p}_proj").weight).detach() for p in PROJECTIONS}


def _streamed_gradients(checkpoint: Checkpoint, labels: list[torch.Tensor], top: list[torch.Tensor], recipe: Recipe,
                        store: LayerStore, progress: bool) -> dict[tuple, torch.Tensor]:
    """Importance scores (returned); Fisher E[g*g] of q/k/v (stored per layer, ``fisher{i}``) and, for recipes with
    local QAT, the rotated dense q/k/v weights and their Fisher (``qat{i}``), from per-window gradients by a
    layer-wise backward (``top``: the last layer's outputs h_L, ``labels`` those of the same windows)."""
    if recipe.allocation != "importance" and not recipe.finetune and not recipe.qat:
        return {}
    norm, head = checkpoint.module(f"{checkpoint.decoder}.norm"), checkpoint.tensor(f"{checkpoint.head}.weight")
    upstream = []  # dL/dh at the current layer boundary, per window [1, S, E]
    for h_L, label in zip(top, labels):
        h = h_L.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = head_loss(norm(h), head, label)
            upstream.append(torch.autograd.grad(loss, h)[0])
    del norm, head
    scores = {}
    layers = checkpoint.text_config.num_hidden_layers
    for i in tqdm(reversed(range(layers)), total=layers, desc="streamed gradients", unit="layer", disable=not progress):
        inputs = store.layer_inputs(i)[:len(labels)]
        captured = capture_layer(checkpoint, i, _seq_len([kwargs["hidden_states"] for kwargs in inputs]))
        (site,) = find_sites(captured.gm)
        weights = _trainable(captured, site)
        rotated = RotatedTargets(qkv_bases(captured.gm, [site])) if recipe.qat else None
        accumulator = None
        if recipe.allocation == "importance":  # the layer's groups again (the same SVDs), for their directions
            groups = layer_groups(site, _qkv_weights(captured, site), store.stats(i), [recipe])
            accumulator = ImportanceAccumulator(groups[(recipe.granularity, recipe.scaling)], site.head_dim)
        sums = {p: torch.zeros_like(w, dtype=torch.float32) for p, w in weights.items()}
        for n in range(len(labels)):
            x = inputs[n]["hidden_states"].detach().requires_grad_(True)
            with torch.enable_grad():
                grads = torch.autograd.grad(captured.gm(**{**inputs[n], "hidden_states": x}), [x] + list(weights.values()),
                                            upstream[n])
            upstream[n] = grads[0]
            by_proj = {(i, p): g for p, g in zip(PROJECTIONS, grads[1:])}
            if accumulator is not None:
                accumulator(by_proj)
            if rotated is not None:
                rotated(by_proj)
            for p in PROJECTIONS:
                sums[p] += by_proj[(i, p)].float().square()
        if accumulator is not None:
            scores.update(accumulator.scores())
        store.put(f"fisher{i:05d}", {p: sums[p] / len(labels) for p in PROJECTIONS})
        if rotated is not None:
            targets = rotated.targets({(i, p): w for p, w in weights.items()})
            store.put(f"qat{i:05d}", {**{f"{p}.weight": targets[(i, p)].weight for p in PROJECTIONS},
                                      **{f"{p}.fisher": targets[(i, p)].fisher for p in PROJECTIONS}})
        del captured, site, weights, rotated, inputs, accumulator
        release_memory()
    return scores


def _trainable(captured: CapturedGraph, site: AttentionSite) -> dict[str, torch.Tensor]:
    """The layer's q/k/v weights (``proj -> tensor``), the only parameters of the graph that require grad."""
    names = {getattr(site, f"{p}_proj").weight: p for p in PROJECTIONS}
    weights = {}
    for name, param in captured.gm.named_parameters():
        param.requires_grad_(name in names)
        if name in names:
            weights[names[name]] = param
    return {p: weights[p] for p in PROJECTIONS}


def _heal_samples(store: LayerStore, layer: int, recipe: Recipe) -> list[dict[str, torch.Tensor]]:
    """Layer ``layer``'s healing samples, one per window: its dense input h_i and output h_{i+1} [1, S, E], in the
    rotated basis (h S1) when the recipe rotates, as its compressed graph sees them."""
    inputs, targets = store.layer_inputs(layer), store.hidden(layer + 1)
    S1 = random_hadamard(targets[0].shape[-1], S1_SEED).to(targets[0].dtype) if recipe.rotate else None
    return [{**kwargs, "hidden_states": kwargs["hidden_states"] @ S1, "target": y @ S1} if S1 is not None else
            {**kwargs, "target": y} for kwargs, y in zip(inputs, targets)]


def _qat_targets(store: LayerStore, layer: int) -> dict[tuple[int, str], QATTarget]:
    t = store.get(f"qat{layer:05d}")
    return {(layer, p): QATTarget(t[f"{p}.weight"], t[f"{p}.fisher"]) for p in PROJECTIONS}


def compress_streamed(checkpoint: Checkpoint, calib: StreamedCalibration, recipe: Recipe, rho1: float | None, bits: Bits,
                      out: str | Path, *, rho2: float | None = None, save_dtype: torch.dtype = torch.bfloat16,
                      progress: bool = True) -> tuple[FactorReport, list[Path]]:
    """Ranks allocated over all layers under ``rho1`` and/or the cache budget ``rho2`` (as in the whole-model mode),
    then each layer compressed by the recipe's passes (step 3 above) and its new tensors written packed as its own
    shard of ``out`` with its report (a layer whose shard exists is not redone: ``--resume``), then the no-layer
    graph's shard. Returns the factor report of the whole model and the shards."""
    key = (recipe.granularity, recipe.scaling)
    cache_dense = calib.layers * 2 * calib.heads["n_kv_heads"] * calib.heads["head_dim"]  # every layer alike
    kept = allocate_ranks(calib.groups, calib.scores, recipe, rho1, rho2, cache_dense)
    shards, reports = [], []
    for i in tqdm(range(calib.layers), desc="streamed compression", unit="layer", disable=not progress):
        shard, spectra = Path(out) / f"layer{i:05d}.safetensors", f"spectra{i:05d}"
        if shard.is_file() and (calib.store.directory / f"{spectra}.safetensors").is_file():
            reports.append(_report_of(shard_metadata(shard)["report"], calib.store.get(spectra)))
            shards.append(shard)
            continue
        samples = _heal_samples(calib.store, i, recipe) if recipe.heal_steps else None
        captured = capture_layer(checkpoint, i, *([_seq_len([s["hidden_states"] for s in samples])] if samples else []))
        (site,) = find_sites(captured.gm)
        stats = calib.store.stats(i)
        fisher = calib.store.get(f"fisher{i:05d}") if recipe.finetune else {}
        targets = _qat_targets(calib.store, i) if recipe.qat else None
        layer = Calibration([site], [stats], {i: _qkv_weights(captured, site)}, {key: [g for g in calib.groups if g.layer == i]},
                            {key: calib.scores}, {(i, p): f for p, f in fisher.items()}, calib.samples, targets)
        plan, report = factor_plan(layer, recipe, rho1, rho2, kept=kept)
        passes = recipe_passes(recipe, bits, plan, targets, heal_data=(LayerOutputError(), samples) if samples else None)
        report.qat = next((p.report for p in passes if isinstance(p, LocalQAT)), None)  # filled in as the passes run
        report.heal = next((p.report for p in passes if isinstance(p, Heal)), None)
        shards.append(_write_compressed(captured, passes, out, shard.stem, save_dtype,
                                        lambda: {"report": json.dumps(report.as_dict())}))
        calib.store.put(spectra, report.spectra)
        reports.append(report)
        del captured, site, layer, plan, passes
        release_memory()
    top = recipe_passes(dataclasses.replace(recipe, heal_steps=0), bits, {}, {})  # it has no factors to heal
    shards.append(_write_compressed(capture_top(checkpoint), top, out, TOP_SHARD, save_dtype))
    return _merged(reports, calib.groups, kept, rho2), shards


TOP_SHARD = "top"  # the shard of the no-layer graph (embedding, final norm, LM head)


def _write_compressed(captured: CapturedGraph, passes: list[GraphPass], out: str | Path, name: str,
                      save_dtype: torch.dtype, metadata=lambda: {}) -> Path:
    """Run ``passes`` on ``captured`` and write what changed, packed, as the shard ``out/name.safetensors`` with
    ``metadata()`` (called after the passes, which fill in their reports)."""
    reference = digests(captured.gm)  # the layer's dense tensors are freed as the passes replace them
    Pipeline(passes)(captured)
    stored, storage = packed_changes(reference, captured.gm, save_dtype)
    return write_shard(out, name, stored, {**metadata(), "storage": json.dumps(storage)})


def _report_of(text: str, spectra: dict[str, torch.Tensor]) -> FactorReport:
    """The :class:`FactorReport` of one layer back from ``as_dict`` JSON and its spectra."""
    d = json.loads(text)
    return FactorReport(d["rho1"], d["rho2"], {int(k): v for k, v in d["ranks"].items()}, d["rho1_per_layer"],
                        d["rho2_per_layer"], [tuple(k) for k in d["above_break_even"]], d["finetune"],
                        {int(k): v for k, v in d["reconstruction"].items()}, spectra, d["qat"], d["heal"], d["rho2_target"])


def _merged(reports: list[FactorReport], groups: list[Group], kept, rho2_target: float | None) -> FactorReport:
    """One report of all layers from the per-layer ones (rho1 over all groups, rho2 the mean over layers)."""
    rho2 = [r for report in reports for r in report.rho2_per_layer]
    ft = qat = heal = None
    if reports[0].finetune is not None:
        ft = {k: sum(r.finetune[k] for r in reports) for k in reports[0].finetune}
    if reports[0].qat is not None:  # losses and heads summed over the layers, as one LocalQAT over the model
        qat = {**reports[0].qat, **{k: sum(r.qat[k] for r in reports) for k in ("loss_before", "loss_after", "heads")}}
    if reports[0].heal is not None:  # layer-local: each layer's relative output error, and their mean
        values = ("calib_before", "calib_after", "val_before", "val_after")
        heal = {**{k: v for k, v in reports[0].heal.items() if k not in values + ("steps_taken", "best_step",
                                                                                  "val_history", "train_history")},
                **{k: sum(r.heal[k] for r in reports) / len(reports) for k in values},
                "seconds": round(sum(r.heal["seconds"] for r in reports), 1),
                "per_layer": {str(i): {k: r.heal[k] for k in ("val_before", "val_after", "best_step")}
                              for i, r in enumerate(reports)}}
    return FactorReport(
        achieved_rho1(groups, kept), sum(rho2) / len(rho2), {k: v for r in reports for k, v in r.ranks.items()},
        [x for r in reports for x in r.rho1_per_layer], rho2, above_break_even(groups, kept), ft,
        {k: v for r in reports for k, v in r.reconstruction.items()}, {k: v for r in reports for k, v in r.spectra.items()},
        qat, heal, rho2_target)


def compress_checkpoint(path: str | Path, data: torch.Tensor | list[dict], recipe: Recipe, rho1: float | None, bits: Bits,
                        out: str | Path, *, rho2: float | None = None, dtype: torch.dtype = torch.float32,
                        grad_samples: int | None = None,
                        offload_dir: str | Path | None = None, resume: bool = False, calibration: dict,
                        environment: dict, save_dtype: torch.dtype = torch.bfloat16, progress: bool = True) -> dict:
    """Streamed compression of the checkpoint at ``path`` into the artifact directory ``out``, calibrated on
    ``data`` (:func:`calibration_inputs`); its manifest.

    Per-layer inputs, statistics and Fisher wait in ``offload_dir/.stream-work`` (default ``out``), removed at
    the end. ``resume`` continues a run that was killed: the same model, recipe, rho1, rho2 and calibration windows
    (checked), with its calibration and the layers already written kept. Fixes glibc's mmap threshold for the
    rest of the process (:func:`bound_heap`).
    """
    import shutil

    if (refusal := unstreamable(recipe, bits)) is not None:
        raise WsvdError(refusal)
    bound_heap()
    checkpoint = Checkpoint(path, dtype)
    work = Path(offload_dir or out) / ".stream-work"
    run = {"wsvd_version": library_version(),  # shards written by another version may lack what this one reads
           "model": str(Path(path).resolve()), "config": checkpoint.config.to_dict(), "dtype": str(dtype),
           "recipe": dataclasses.asdict(recipe), "rho1": rho1, "rho2": rho2, "bits": bits.name, "grad_samples": grad_samples,
           "windows_sha256": _sha256(data)}
    if resume:
        if not (work / "run.json").is_file():
            raise WsvdError(f"--resume: {work} holds no interrupted run: compress without --resume")
        started = json.loads((work / "run.json").read_text())
        changed = [k for k in run if json.dumps(run[k], sort_keys=True, default=str) !=
                   json.dumps(started.get(k), sort_keys=True, default=str)]
        if changed:
            raise WsvdError(f"--resume: {out} was started with another {changed[0].replace('_', ' ')}: give the same "
                            "model, recipe, --rho1, --bits and calibration, or compress without --resume")
    else:
        shutil.rmtree(work, ignore_errors=True)
        for stale in [*Path(out).glob("layer*.safetensors"), Path(out) / f"{TOP_SHARD}.safetensors"]:
            stale.unlink(missing_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        (work / "run.json").write_text(json.dumps(run, sort_keys=True, default=str))
    store = LayerStore(work)
    calib = load_calibration(store) if resume else None
    if calib is None:
        calib = calibrate_streamed(checkpoint, data, recipe, work, grad_samples=grad_samples, progress=progress)
        save_calibration(calib)
    report, shards = compress_streamed(checkpoint, calib, recipe, rho1, bits, out, rho2=rho2, save_dtype=save_dtype,
                                       progress=progress)
    calibration = {**calibration, "grad_samples": calib.samples}
    manifest = save_streamed(out, model=run["model"], model_sha256=checkpoint.fingerprint(), shards=shards,
                             heads=calib.heads, recipe=recipe, bits=bits, rho1_target=rho1, report=report,
                             calibration=calibration, environment=environment)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _sha256(data: torch.Tensor | list[dict]) -> str:
    """sha256 of the calibration data (token ids, or every tensor of the image-text samples)."""
    digest = hashlib.sha256()
    for t in [data] if torch.is_tensor(data) else [t for sample in data for _, t in sorted(sample.items())]:
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()

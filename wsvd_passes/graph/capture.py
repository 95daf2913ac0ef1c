"""Capture a Hugging Face decoder with ``torch.export``.

Two graphs are captured from the same eager model:

- ``forward``: full-sequence logits, ``gm(input_ids [B, S]) -> logits [B, S, V]``
  with dynamic batch and sequence dims (calibration, gradients, evaluation);
- ``decode``: one new token against a preallocated static KV cache (transformers'
  ExecuTorch recipe), ``gm(input_ids [B, 1], cache_position [1]) -> logits [B, 1, V]``;
  the cache lives in mutable buffers of the graph module.

Vision-language models (a config with a vision config) are captured at their language
decoder plus LM head instead, with ``inputs_embeds`` in place of ``input_ids`` (and, for
multimodal RoPE, ``position_ids [3, B, S]`` in the full-sequence graph); their eager inputs
come from :mod:`wsvd_passes.models.vlm`.

Passes edit the *unlifted* graph module (``ep.module()``); parameters and buffers
are attributes of it, reached by ``get_attr`` nodes. They share storage with the
eager model (no copy is made), so passes replace tensors and never write into
existing ones. :meth:`CapturedGraph.reexport`
turns the edited module back into an ``ExportedProgram``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Literal

import torch

from ..errors import WsvdError
from .graph_utils import TIED_HEAD


class CausalLMLogits(torch.nn.Module):
    """Wraps a causal LM so that export sees ``input_ids -> logits`` and nothing else."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


@dataclasses.dataclass
class CapturedGraph:
    """An editable exported graph and what is needed to call and re-export it."""

    gm: torch.fx.GraphModule
    kind: Literal["forward", "decode"]
    example_kwargs: dict
    dynamic_shapes: dict | None
    config: object  # the model's (text) config: rope theta, vocab size, ...

    @property
    def device(self) -> torch.device:
        """Where the graph's inputs (and its parameters and caches) live."""
        return next(iter(self.example_kwargs.values())).device

    def sharing_parameters(self) -> CapturedGraph:
        """A copy to edit: its own graph and buffers (caches), the same parameter tensors.

        Passes replace parameters and never write into them, so compressing the copy leaves this
        graph intact without a second copy of the weights in memory.
        """
        return copy.deepcopy(self, memo={id(p): p for p in self.gm.parameters()})

    def reexport(self) -> torch.export.ExportedProgram:
        """Export the (possibly edited) graph module again, keeping the dynamic dims."""
        return torch.export.export(
            self.gm, (), kwargs=self.example_kwargs, dynamic_shapes=self.dynamic_shapes, strict=False
        )


class DecoderLogits(torch.nn.Module):
    """The language decoder and LM head of a VLM: ``inputs_embeds (, position_ids) -> logits``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None:
            raise WsvdError(f"{type(model).__name__} has no output embeddings (lm_head): cannot produce logits")

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.decoder(inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=False).last_hidden_state
        return self.lm_head(hidden)


def logits_module(model: torch.nn.Module) -> torch.nn.Module:
    """What the full-sequence capture exports: :class:`DecoderLogits` of a VLM, else :class:`CausalLMLogits`. Its
    parameter names are the graph's (``model.model.layers.0...``, ``decoder.layers.0...``)."""
    return DecoderLogits(model) if is_vlm(model) else CausalLMLogits(model)


def unlift(ep: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The exported program as an editable GraphModule (parameters and buffers as attributes)."""
    # check_guards=False keeps the input-shape guard node out of the graph we edit;
    # torch releases without that argument never inserted one.
    if "check_guards" in inspect.signature(ep.module).parameters:
        return ep.module(check_guards=False)
    return ep.module()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters (graph inputs are built there)."""
    return next(model.parameters()).device


def is_vlm(model: torch.nn.Module) -> bool:
    """True for image-text models (:func:`vision_language` of their config)."""
    return vision_language(getattr(model, "config", None))


def vision_language(config) -> bool:
    """Whether ``config`` is an image-text model's: it has a vision config."""
    return getattr(config, "vision_config", None) is not None


def uses_mrope(config) -> bool:
    """Multimodal RoPE: each token has (t, h, w) positions, one per section of the rotary frequencies."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return "mrope_section" in (getattr(text, "rope_parameters", None) or {})


def _text_config(model: torch.nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _export_error(e: Exception, what: str) -> WsvdError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return WsvdError(f"torch.export could not capture the {what} of this model ({type(e).__name__}: {first})")


def _tied_head(model: torch.nn.Module) -> bool:
    """Whether the LM head is the embedding table: ``config.tie_word_embeddings``, the flag transformers ties by.

    Read from the config rather than by comparing weights, so that it holds on fake tensors and after
    :func:`untie_output_embeddings` gave the head its own parameter.
    """
    return bool(getattr(model.config, "tie_word_embeddings", False))


def _mark_tied(captured: CapturedGraph, tied: bool) -> CapturedGraph:
    captured.gm.meta[TIED_HEAD] = tied  # read by rotate.RotateResidual; survives deepcopy
    return captured


def untie_output_embeddings(model: torch.nn.Module) -> None:
    """Give a tied LM head its own (equal) parameter; the function is unchanged.

    Strict and non-strict export name a tied weight differently (one name for both uses,
    not the same one), so the passes replayed on the decode graph would name their new
    tensors unlike those of the full-sequence graph (see :mod:`wsvd_passes.artifacts.artifact`).
    """
    get_head, get_embedding = (getattr(model, n, None) for n in ("get_output_embeddings", "get_input_embeddings"))
    head, embedding = (get_head() if get_head else None), (get_embedding() if get_embedding else None)
    if head is not None and embedding is not None and head.weight is embedding.weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)


def capture_forward(model: torch.nn.Module, *, example_batch: int = 2, example_len: int = 17) -> CapturedGraph:
    """Export the full-sequence forward with dynamic batch and sequence length."""
    tied = _tied_head(model)
    untie_output_embeddings(model)
    if is_vlm(model):
        return _mark_tied(_capture_decoder_forward(model, example_batch=example_batch, example_len=example_len), tied)
    config = _text_config(model)
    if getattr(model, "training", False):
        model.eval()
    max_len = int(getattr(config, "max_position_embeddings", 4096))
    example = torch.zeros(example_batch, example_len, dtype=torch.long, device=model_device(model))
    dynamic = {"input_ids": {0: torch.export.Dim("batch", max=1024), 1: torch.export.Dim("seq", min=2, max=max_len)}}
    try:
        with torch.no_grad():
            ep = torch.export.export(
                logits_module(model), (), kwargs={"input_ids": example}, dynamic_shapes=dynamic, strict=False
            )
    except Exception as e:  # noqa: BLE001 - re-raised as one user-facing line
        raise _export_error(e, "full-sequence forward") from e
    return _mark_tied(CapturedGraph(unlift(ep), "forward", {"input_ids": example}, dynamic, config), tied)


def capture_decode(model: torch.nn.Module, *, batch_size: int = 1, max_cache_len: int = 256) -> CapturedGraph:
    """Export one decode step over a static KV cache of ``max_cache_len`` positions (transformers' ExecuTorch
    wrapper): ``input_ids [B, 1]``, or a VLM decoder's ``inputs_embeds [B, 1, E]``, and ``cache_position [1]`` in."""
    tied = _tied_head(model)
    untie_output_embeddings(model)
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    vlm = is_vlm(model)
    if vlm and uses_mrope(model.config):
        raise WsvdError(f"{type(model).__name__} uses multimodal RoPE (3-row position ids): the static-cache decode "
                        "graph and the latent KV cache take 1-D positions; use the full-sequence graph (capture_forward)")
    config = _text_config(model)
    model.eval()
    generation_config = getattr(model, "generation_config", None)
    saved = getattr(generation_config, "cache_implementation", None)
    try:
        if generation_config is not None:
            generation_config.cache_implementation = "static"
        wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=batch_size, max_cache_len=max_cache_len)
        device = model_device(model)
        token = ({"inputs_embeds": torch.zeros(batch_size, 1, config.hidden_size, device=device, dtype=model.dtype)}
                 if vlm else {"input_ids": torch.zeros(batch_size, 1, dtype=torch.long, device=device)})
        example = {**token, "cache_position": torch.zeros(1, dtype=torch.long, device=device)}
        with torch.no_grad():
            ep = wrapper.export(**example, strict=True)  # non-strict lifts the cache as constants
    except Exception as e:  # noqa: BLE001 - re-raised as one user-facing line
        raise _export_error(e, "static-cache decode step") from e
    finally:
        if generation_config is not None:
            generation_config.cache_implementation = saved
    return _mark_tied(CapturedGraph(unlift(ep), "decode", example, None, config), tied)


def _capture_decoder_forward(model: torch.nn.Module, *, example_batch: int = 2, example_len: int = 17) -> CapturedGraph:
    """A VLM's language decoder + lm_head with dynamic batch and sequence (``inputs_embeds`` in)."""
    config = _text_config(model)
    model.eval()
    batch = torch.export.Dim("batch", max=1024)
    seq = torch.export.Dim("seq", min=2, max=int(getattr(config, "max_position_embeddings", 4096)))
    device, dtype = model_device(model), model.dtype
    example = {"inputs_embeds": torch.zeros(example_batch, example_len, config.hidden_size, device=device, dtype=dtype)}
    dynamic = {"inputs_embeds": {0: batch, 1: seq}}
    if uses_mrope(model.config):
        positions = torch.arange(example_len, device=device).expand(3, example_batch, example_len).contiguous()
        example["position_ids"], dynamic["position_ids"] = positions, {1: batch, 2: seq}
    try:
        with torch.no_grad():
            ep = torch.export.export(logits_module(model), (), kwargs=example, dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised as one user-facing line
        raise _export_error(e, "language decoder") from e
    return CapturedGraph(unlift(ep), "forward", example, dynamic, config)

"""A Hugging Face checkpoint directory read one tensor at a time (memory-mapped safetensors), for streamed
compression (:mod:`wsvd_passes.compression.stream`), and whether its whole-model compression would fit in memory."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch

from ..errors import WsvdError
from ..graph.capture import logits_module, uses_mrope, vision_language


class Checkpoint:
    """A Hugging Face checkpoint directory (a causal LM or a VLM) read tensor by tensor from its safetensors
    (memory-mapped).

    Tensors are named as in the model (``skeleton``, on the meta device); the file's keys are mapped to those names by
    transformers' own checkpoint conversion (``save_pretrained`` writes LLaVA's ``model.language_model.*`` as
    ``language_model.model.*``). ``decoder`` is the language decoder's path in the model (``model``,
    ``model.language_model``, ``model.text_model``: the module ``get_decoder()`` returns), ``embedding`` and ``head``
    those of the input and output embeddings; ``graph_paths`` maps model paths to the whole-model capture's
    (:func:`~wsvd_passes.graph.capture.logits_module`), ``graph_names`` the capture's tensor names to the model's.
    """

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32):
        import transformers

        self.path, self.dtype = Path(path), dtype
        if not (self.path / "config.json").is_file():
            raise WsvdError(f"--stream reads a local checkpoint: {path} has no config.json (give a directory)")
        self.config = transformers.AutoConfig.from_pretrained(self.path)
        self.text_config = self.config.get_text_config()
        self.config._attn_implementation = self.text_config._attn_implementation = "sdpa"
        self.vlm, self.mrope = vision_language(self.config), uses_mrope(self.config)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise WsvdError(f"{path} has no model.safetensors(.index.json): --stream reads safetensors checkpoints")
        missing = [f for f in files if not (self.path / f).is_file()]
        if missing:
            raise WsvdError(f"{path} lacks the shard {missing[0]} named by its index: download the whole checkpoint")
        auto = transformers.AutoModelForImageTextToText if self.vlm else transformers.AutoModelForCausalLM
        with torch.device("meta"):
            self.skeleton = auto.from_config(self.config)
        self._where = self._file_keys(files)
        paths = {id(m): n for n, m in self.skeleton.named_modules()}
        self.decoder, self.embedding, self.head = (paths[id(m)] for m in (
            self.skeleton.get_decoder(), self.skeleton.get_input_embeddings(), self.skeleton.get_output_embeddings()))
        names = {}  # tensor id -> model names (a tied head and its embedding share one)
        for name, t in self.skeleton.state_dict(keep_vars=True).items():
            names.setdefault(id(t), []).append(name)
        self._aliases = {n: group for group in names.values() for n in group}
        wrapper = logits_module(self.skeleton)
        self.graph_paths = {paths[id(m)]: n for n, m in wrapper.named_modules() if id(m) in paths}
        self.graph_names = {n: names[id(t)][0] for n, t in wrapper.state_dict(keep_vars=True).items()}

    def _file_keys(self, files: list[str]) -> dict[str, tuple[str, str]]:
        """Model tensor name -> (file, key), by transformers' renaming of checkpoint keys (tensors that transformers
        converts on loading, e.g. fused experts, are refused)."""
        import transformers
        from safetensors import safe_open

        try:  # transformers' own key renaming (5.x internals; tested with 5.25)
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        except ImportError as e:
            raise WsvdError(f"--stream maps checkpoint keys with transformers' conversion mapping, which transformers "
                            f"{transformers.__version__} lacks ({e}): upgrade transformers, or compress with "
                            "--no-stream") from None

        mapping = get_model_conversion_mapping(self.skeleton)
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        expected, prefix = self.skeleton.state_dict(), self.skeleton.base_model_prefix
        where = {}
        for file in files:
            with safe_open(self.path / file, "pt") as f:
                for key in f.keys():
                    name, converted = rename_source_key(key, renamings, converters, prefix, expected)
                    if converted is not None:
                        raise WsvdError(f"{self.path}: transformers converts the checkpoint tensor {key} on loading "
                                        "(not a plain rename), which --stream does not read: compress with --no-stream")
                    where[name if name in expected else key] = (file, key)
        return where

    def tensor(self, name: str) -> torch.Tensor:
        """The model tensor ``name`` (a tied LM head reads the embedding) from the checkpoint in the model dtype,
        checked against the model's shape."""
        stored = next((self._where[n] for n in self._aliases.get(name, [name]) if n in self._where), None)
        if stored is None:
            raise WsvdError(f"{self.path}: the checkpoint has no tensor {name}: its shards are incomplete or belong to "
                            "another model")
        from safetensors import safe_open

        file, key = stored
        with safe_open(self.path / file, "pt") as f:  # mapped only while read: RSS stays one tensor
            value = f.get_tensor(key).to(self.dtype)
        expected = self.skeleton.get_parameter(name).shape
        if value.shape != expected:
            raise WsvdError(f"{self.path}: {key} is {tuple(value.shape)}, the config says {tuple(expected)}: "
                            "the shards do not match config.json")
        return value

    def module(self, path: str) -> torch.nn.Module:
        """A real (CPU) copy of the skeleton's submodule ``path`` with its checkpoint weights."""
        module = copy.deepcopy(self.skeleton.get_submodule(path))
        prefix = f"{path}." if path else ""
        state = {n: self.tensor(prefix + n) for n, _ in module.named_parameters()}
        module.load_state_dict(state, assign=True, strict=True)
        return module.eval()

    def without_layers(self) -> torch.nn.Module:
        """The whole model with no decoder layers (embedding, final norm, LM head; a VLM's vision tower and
        projector), loaded by transformers from the checkpoint (its non-persistent buffers built as it builds them)."""
        import transformers

        config = copy.deepcopy(self.config)
        text = config.get_text_config()
        text.num_hidden_layers = 0
        if getattr(text, "layer_types", None) is not None:
            text.layer_types = []
        auto = transformers.AutoModelForImageTextToText if self.vlm else transformers.AutoModelForCausalLM
        logging = transformers.utils.logging
        verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
        logging.set_verbosity_error()  # its load report lists every layer tensor as unexpected
        logging.disable_progress_bar()
        try:
            model = auto.from_pretrained(self.path, config=config, dtype=self.dtype, attn_implementation="sdpa")
        finally:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()
        return model.eval()

    def fingerprint(self) -> str:
        """:func:`~wsvd_passes.artifacts.artifact.fingerprint` of the whole-model capture, one tensor at a time."""
        digest = hashlib.sha256()
        for name in sorted(self.graph_names):
            digest.update(name.encode())
            digest.update(self.tensor(self.graph_names[name]).contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


# Peak RSS of the whole-model compression over the model's parameter bytes in its compute dtype; the least
# measured (`/usr/bin/time -v`): 4.2 for a TinyLlama-1.1B-shaped checkpoint (wsvd-noq, 4 windows, 17.3 GiB),
# 10 for SmolLM2-135M (wsvd W8A8e8, 4 windows, 5.47 GB).
WHOLE_MODEL_FACTOR = 4


def whole_model_need(checkpoint: Checkpoint) -> int:
    """Bytes the whole-model compression of ``checkpoint`` needs at least: WHOLE_MODEL_FACTOR x its parameters
    (a tied head counted once) in the compute dtype."""
    numel = sum(p.numel() for p in checkpoint.skeleton.parameters())
    return WHOLE_MODEL_FACTOR * numel * checkpoint.dtype.itemsize


def available_memory() -> int | None:
    """Bytes the OS can give this process now without swapping (``MemAvailable``; None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

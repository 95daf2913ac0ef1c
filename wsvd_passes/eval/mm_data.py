"""Image-text data: a JSONL format, prompts through the processor's chat template, answer-only labels.

One JSON object per line; image paths are relative to the JSONL file::

    {"id": "q0", "image": "images/q0.png", "question": "What shape is shown?", "answer": "a circle"}
    {"id": "q1", "image": "images/q1.png", "question": "What colour is the shape?",
     "options": ["red", "green", "blue"], "answer": "B"}

With ``options`` the item is multiple choice: the prompt lists them as lettered lines and the
answer is the letter (``A``, ``B``, ...). A sample is the user turn (image + prompt) and the
assistant turn (the answer) rendered by the processor's chat template:

    input_ids  = [prompt tokens (image tokens expanded) | answer tokens]      [1, S]
    labels     = [-100 ...                              | answer tokens]      [1, S]

Labels are the input ids themselves, unshifted: :func:`~wsvd_passes.compression.calibration.next_token_loss`
shifts once, so logits at t are scored against labels[t + 1] and only answer tokens count.
:func:`check_labels` refuses labels that are not aligned this way. Samples hold what the
captured decoder takes (``inputs_embeds`` from the eager vision tower and projector, and
``position_ids`` for multimodal RoPE) plus ``labels``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import string
from pathlib import Path

import torch

from ..errors import WsvdError
from ..models.vlm import decoder_inputs

LETTERS = string.ascii_uppercase
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass
class MMItem:
    """One image-text item of a JSONL file."""

    id: str
    image: Path
    question: str
    answer: str  # free text, or the option letter when ``options`` is given
    options: list[str] | None = None

    @property
    def prompt(self) -> str:
        """The user's text: the question, then ``A. option`` lines and the instruction for multiple choice."""
        if self.options is None:
            return self.question
        lines = [f"{LETTERS[i]}. {o}" for i, o in enumerate(self.options)]
        return "\n".join([self.question, *lines, MC_INSTRUCTION])


def load_items(path: str | Path) -> list[MMItem]:
    """Read and validate a JSONL file of image-text items."""
    path = Path(path)
    if not path.is_file():
        raise WsvdError(f"data file {path} does not exist: pass a JSONL file of image, question, answer records")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise WsvdError(f"{where} is not valid JSON ({e.msg}): write one JSON object per line") from None
        if not isinstance(record, dict):
            raise WsvdError(f"{where} is not a JSON object: write one object per line")
        missing = [k for k in ("image", "question", "answer") if not isinstance(record.get(k), str)]
        if missing:
            raise WsvdError(f"{where} lacks the string field {missing[0]!r}: every line needs image, question and answer")
        image = path.parent / record["image"]
        if not image.is_file():
            raise WsvdError(f"{where}: image {image} does not exist (image paths are relative to the JSONL file)")
        options = record.get("options")
        if options is not None:
            if not (isinstance(options, list) and 2 <= len(options) <= len(LETTERS) and all(isinstance(o, str) for o in options)):
                raise WsvdError(f"{where}: options must be a list of 2 to 26 strings")
            if record["answer"] not in LETTERS[: len(options)]:
                raise WsvdError(f"{where}: answer {record['answer']!r} is not one of the option letters "
                                f"{', '.join(LETTERS[: len(options)])}")
        items.append(MMItem(str(record.get("id", n)), image, record["question"], record["answer"], options))
    if not items:
        raise WsvdError(f"data file {path} holds no items")
    return items


def sample_items(items: list[MMItem], n: int | None, seed: int) -> list[MMItem]:
    """``n`` items drawn without replacement by a seeded generator (all, in file order, when n is None)."""
    if n is None or n >= len(items):
        return list(items)
    if n < 1:
        raise WsvdError(f"cannot sample {n} items: ask for at least 1")
    return random.Random(seed).sample(items, n)


def _image(item: MMItem):
    from PIL import Image

    try:
        with Image.open(item.image) as img:
            return img.convert("RGB")
    except OSError as e:
        raise WsvdError(f"cannot read image {item.image} ({e}): give PNG or JPEG files") from None


def _messages(item: MMItem, answer: str | None) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.prompt}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def prompt_text(processor, item: MMItem) -> str:
    """The chat-templated user turn, ending where the assistant's answer starts."""
    if getattr(processor, "chat_template", None) is None:
        raise WsvdError("the processor has no chat template: save one with the checkpoint (processor.chat_template)")
    return processor.apply_chat_template(_messages(item, None), add_generation_prompt=True, tokenize=False)


def prompt_inputs(lm, item: MMItem):
    """Decoder inputs of the prompt alone (for scoring and generation): :class:`~wsvd_passes.models.vlm.DecoderInputs`."""
    return decoder_inputs(lm.model, lm.processor(text=prompt_text(lm.processor, item), images=[_image(item)],
                                                 return_tensors="pt"))


def labelled_sample(lm, item: MMItem) -> dict:
    """Graph kwargs of prompt + answer and ``labels`` [1, S]: the answer tokens, -100 elsewhere."""
    processor = lm.processor
    prompt = prompt_text(processor, item)
    full = processor.apply_chat_template(_messages(item, item.answer), tokenize=False)
    if not full.startswith(prompt):
        raise WsvdError("the chat template renders the prompt differently once an answer follows: answer-only "
                        "labels need the prompt to be a prefix of the conversation")
    image = _image(item)
    prompt_ids = processor(text=prompt, images=[image], return_tensors="pt")["input_ids"]
    processed = processor(text=full, images=[image], return_tensors="pt")
    ids, P = processed["input_ids"], prompt_ids.shape[1]
    if ids.shape[1] <= P or not torch.equal(ids[:, :P], prompt_ids):
        raise WsvdError(f"item {item.id}: the tokenised prompt is not a prefix of the tokenised conversation, so the "
                        "answer tokens cannot be located")
    labels = ids.clone()
    labels[:, :P] = -100
    inputs = decoder_inputs(lm.model, processed)
    check_labels(inputs.input_ids, labels, image_token_id=_image_token_id(lm))
    return {**inputs.kwargs, "labels": labels}


def _image_token_id(lm) -> int | None:
    config = lm.model.config
    return getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)


def check_labels(input_ids: torch.Tensor, labels: torch.Tensor, *, image_token_id: int | None = None) -> None:
    """Refuse labels that are not the unshifted input ids (or -100), supervise nothing, or supervise image tokens."""
    if labels.shape != input_ids.shape:
        raise WsvdError(f"labels {tuple(labels.shape)} and input ids {tuple(input_ids.shape)} differ in shape")
    supervised = labels != -100
    if not supervised[:, 1:].any():
        raise WsvdError("no label after the first position is supervised: nothing to compute a loss on")
    wrong = supervised & (labels != input_ids)
    if wrong.any():
        b, t = (int(i) for i in wrong.nonzero()[0])
        raise WsvdError(f"label at position {t} is token {int(labels[b, t])} but the input there is {int(input_ids[b, t])}: "
                        "labels must be the unshifted input ids (next_token_loss shifts them once)")
    if image_token_id is not None and (supervised & (input_ids == image_token_id)).any():
        raise WsvdError("an image token is supervised: mask image positions with -100")


def image_text_samples(lm, items: list[MMItem]) -> list[dict]:
    """Labelled samples (batch 1 each) for calibration, gradients and evaluation."""
    if lm.processor is None:
        raise WsvdError(f"{lm.name} is a text-only model: image-text data needs a vision-language model")
    return [labelled_sample(lm, item) for item in items]

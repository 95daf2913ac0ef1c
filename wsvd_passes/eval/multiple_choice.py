"""Multiple-choice evaluation of VLMs (ScienceQA-IMG / SEED-Bench style).

Each item is an image, a question and lettered options (:mod:`wsvd_passes.eval.mm_data`). With
the chat-templated prompt ending where the assistant's answer starts, the prediction is

    argmax_{L in A, B, ...} log p(L | image, prompt)

read from the logits at the prompt's last position (the letter's first token as it follows
the prompt). Optionally a greedy continuation of up to ``max_new_tokens`` tokens is
generated through the same full-sequence graph and its first option letter is a second
prediction. Accuracy is the fraction of items predicted right; every item's scores go to
the per-item records. Several models (e.g. uncompressed and compressed) are scored on the
same prepared inputs, so the vision tower runs once per item.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch

from ..errors import WsvdError
from ..models.vlm import append_token
from .mm_data import LETTERS, MMItem, prompt_inputs, prompt_text

GraphLogits = Callable[[dict], torch.Tensor]  # graph kwargs (inputs_embeds, ...) -> logits [B, S, V]


@dataclasses.dataclass
class PreparedItem:
    item: MMItem
    kwargs: dict  # decoder inputs of the prompt, batch 1
    letter_ids: list[int]  # token id of each option letter as it follows the prompt


@dataclasses.dataclass
class MCResult:
    accuracy: float
    correct: int
    total: int
    items: list[dict]
    generation_accuracy: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def letter_token(tokenizer, prompt: str, letter: str) -> int:
    """The first token of ``letter`` when it directly follows ``prompt``."""
    base = tokenizer(prompt, add_special_tokens=False).input_ids
    extended = tokenizer(prompt + letter, add_special_tokens=False).input_ids
    if len(extended) <= len(base) or extended[: len(base)] != base:
        raise WsvdError(f"the tokenizer merges the option letter {letter!r} into the prompt's last token: "
                        "cannot score letters")
    return extended[len(base)]


def prepare(lm, items: list[MMItem]) -> list[PreparedItem]:
    """Prompt inputs and option-letter tokens of multiple-choice ``items``."""
    if lm.processor is None:
        raise WsvdError(f"{lm.name} is a text-only model: multiple-choice image questions need a vision-language model")
    prepared = []
    for item in items:
        if item.options is None:
            raise WsvdError(f"item {item.id} has no options: multiple-choice evaluation needs an options list per line")
        prompt = prompt_text(lm.processor, item)
        letters = [letter_token(lm.tokenizer, prompt, L) for L in LETTERS[: len(item.options)]]
        prepared.append(PreparedItem(item, prompt_inputs(lm, item).kwargs, letters))
    return prepared


@torch.no_grad()
def score(logits_fn: GraphLogits, prepared: list[PreparedItem], *, model: torch.nn.Module | None = None,
          tokenizer=None, max_new_tokens: int = 0) -> MCResult:
    """Accuracy by option-letter likelihood (and by greedy generation when ``max_new_tokens`` > 0)."""
    if max_new_tokens and (model is None or tokenizer is None):
        raise WsvdError("generation needs the eager model (for token embeddings) and the tokenizer")
    records, correct, gen_correct = [], 0, 0
    for p in prepared:
        logp = torch.log_softmax(logits_fn(p.kwargs)[0, -1].double(), -1)
        scores = [float(logp[t]) for t in p.letter_ids]
        letters = LETTERS[: len(scores)]
        prediction = letters[max(range(len(scores)), key=scores.__getitem__)]  # ties: the earlier letter
        record = {"id": p.item.id, "answer": p.item.answer, "prediction": prediction,
                  "correct": prediction == p.item.answer, "letter_logprobs": dict(zip(letters, scores))}
        correct += record["correct"]
        if max_new_tokens:
            text = tokenizer.decode(_greedy(logits_fn, model, p.kwargs, max_new_tokens, tokenizer.eos_token_id),
                                    skip_special_tokens=True)
            found = re.search(rf"\b([{letters}])\b", text)
            record.update(generated=text, generated_prediction=found.group(1) if found else None)
            record["generated_correct"] = record["generated_prediction"] == p.item.answer
            gen_correct += record["generated_correct"]
        records.append(record)
    n = len(prepared)
    if n == 0:
        raise WsvdError("no multiple-choice items to evaluate")
    return MCResult(correct / n, correct, n, records, gen_correct / n if max_new_tokens else None)


def _greedy(logits_fn: GraphLogits, model, kwargs: dict, max_new_tokens: int, eos: int | None) -> list[int]:
    """Greedy tokens through the full-sequence graph (no cache; each step re-reads the sequence)."""
    tokens = []
    for _ in range(max_new_tokens):
        token = logits_fn(kwargs)[:, -1].argmax(-1)
        if eos is not None and int(token) == eos:
            break
        tokens.append(int(token))
        kwargs = append_token(model, kwargs, token)
    return tokens


def compare(models: dict[str, GraphLogits], prepared: list[PreparedItem], **kwargs) -> dict:
    """Score several models on the same items; adds the fraction of items where each agrees with the first."""
    results = {name: score(fn, prepared, **kwargs) for name, fn in models.items()}
    first = next(iter(results.values()))
    out = {name: r.as_dict() for name, r in results.items()}
    for name, r in results.items():
        same = sum(a["prediction"] == b["prediction"] for a, b in zip(first.items, r.items))
        out[name]["agreement"] = same / len(r.items)
    return out

"""Calibration and evaluation text, tokenised into fixed-length windows.

The embedded corpus is ``pydoc_data.topics`` from the standard library: topics in
sorted order, odd-indexed ones form the calibration half and even-indexed ones the
evaluation half, so the two never share text. Any plain-text file can replace it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import WsvdError

SPLITS = ("calibration", "evaluation")


def pydoc_text(split: str) -> str:
    """One deterministic half of the standard library's pydoc topics."""
    if split not in SPLITS:
        raise WsvdError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    from pydoc_data.topics import topics

    parity = 1 if split == "calibration" else 0
    names = sorted(topics)
    return "\n\n".join(topics[n] for i, n in enumerate(names) if i % 2 == parity)


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise WsvdError(f"data file {path} does not exist: pass a plain-text file with --data")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise WsvdError(f"data file {path} is not UTF-8 text: pass a plain-text file with --data") from None
    if not text.strip():
        raise WsvdError(f"data file {path} is empty: pass a file with text to evaluate on")
    return text


def text_source(data: str | Path | None, split: str) -> tuple[str, dict]:
    """Text for ``split`` and its provenance (source, sha256, characters)."""
    text = pydoc_text(split) if data is None else read_text(data)
    source = f"pydoc_data.topics:{split}" if data is None else str(data)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return text, {"source": source, "sha256": digest, "chars": len(text)}


def token_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Tokenise ``text`` and cut it into non-overlapping windows: int64 [n_windows, seq_len].

    The tail shorter than ``seq_len`` is dropped so that every window scores the
    same number of tokens. ``max_windows`` keeps the first windows (deterministic).
    """
    if seq_len < 2:
        raise WsvdError(f"sequence length {seq_len} is too short: next-token loss needs at least 2 tokens")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False).input_ids[0]
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise WsvdError(
            f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}: "
            "give more text or a shorter --seq-len"
        )
    return ids[: n * seq_len].view(n, seq_len).clone()

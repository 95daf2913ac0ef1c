"""Calibration/evaluation text and windows."""

import pytest
import torch
from conftest import tiny

from wsvd_passes.errors import WsvdError
from wsvd_passes.eval.data import pydoc_text, read_text, text_source, token_windows


def test_pydoc_halves_are_disjoint_and_deterministic():
    from pydoc_data.topics import topics

    calib, evaluation = pydoc_text("calibration"), pydoc_text("evaluation")
    assert calib == pydoc_text("calibration")
    names = sorted(topics)
    assert topics[names[1]] in calib and topics[names[1]] not in evaluation
    assert topics[names[0]] in evaluation and topics[names[0]] not in calib
    separators = 2 * (len(names) - 2)  # "\n\n" between topics within each half
    assert len(calib) + len(evaluation) == sum(len(t) for t in topics.values()) + separators


def test_windows_are_cut_without_padding(tmp_path):
    tok = tiny("tiny-llama").tokenizer
    text = "abcdefghij" * 10  # 100 byte tokens
    w = token_windows(tok, text, 7)
    assert w.shape == (14, 7) and w.dtype == torch.long
    assert torch.equal(w.flatten(), tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0, :98])
    assert token_windows(tok, text, 7, max_windows=3).shape == (3, 7)


def test_file_source_and_its_errors(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n")
    text, prov = text_source(f, "evaluation")
    assert text == "hello world\n" and prov["source"] == str(f) and len(prov["sha256"]) == 64
    with pytest.raises(WsvdError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(WsvdError, match="is empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(WsvdError, match="not UTF-8"):
        read_text(tmp_path / "bin")
    with pytest.raises(WsvdError, match="fewer than one window of 256"):
        token_windows(tiny("tiny-llama").tokenizer, "short", 256)

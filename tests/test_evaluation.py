"""Evaluation metrics against Hugging Face's own loss and against themselves."""

import math

import pytest
import torch
from conftest import tiny, tiny_forward

from wsvd_passes.errors import WsvdError
from wsvd_passes.eval.evaluation import evaluate


def test_perplexity_matches_hf_loss_and_self_comparison_is_exact():
    lm, captured = tiny("tiny-llama-gqa"), tiny_forward("tiny-llama-gqa")
    windows = torch.randint(0, 384, (5, 33))
    fn = lambda ids: captured.gm(input_ids=ids)  # noqa: E731
    result = evaluate(fn, windows, reference=fn, batch_size=2, progress=False)
    with torch.no_grad():
        hf = lm.model(windows, labels=windows, use_cache=False).loss
    assert result.tokens == 5 * 32
    assert result.ppl == pytest.approx(math.exp(hf.item()), rel=1e-5)
    assert result.kl == pytest.approx(0.0, abs=1e-12) and result.top1 == 1.0 and result.ref_ppl == result.ppl


def test_kl_and_top1_against_float64_reference():
    torch.manual_seed(0)
    vocab = 13
    table_a, table_b = torch.randn(vocab, vocab) * 3, torch.randn(vocab, vocab) * 3
    model = lambda ids: table_a[ids]  # noqa: E731  (logits depend on the current token only)
    ref = lambda ids: table_b[ids]  # noqa: E731
    windows = torch.randint(0, vocab, (3, 7))
    result = evaluate(model, windows, reference=ref, batch_size=2, progress=False)
    cur = windows[:, :-1].reshape(-1)
    lp, lq = table_b.double().log_softmax(-1)[cur], table_a.double().log_softmax(-1)[cur]
    assert result.kl == pytest.approx(float((lp.exp() * (lp - lq)).sum(-1).mean()), rel=1e-12)
    assert result.top1 == pytest.approx(float((lp.argmax(-1) == lq.argmax(-1)).double().mean()))
    nll = -lq.gather(1, windows[:, 1:].reshape(-1, 1)).mean()
    assert result.ppl == pytest.approx(math.exp(float(nll)), rel=1e-12)
    assert 0 < result.kl and result.top1 < 1


def test_bad_windows_are_rejected():
    with pytest.raises(WsvdError, match=r"must be \[n, S>=2\]"):
        evaluate(lambda ids: ids, torch.zeros(3, 1, dtype=torch.long), progress=False)

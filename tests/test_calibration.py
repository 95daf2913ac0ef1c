"""Calibration statistics and per-sample gradients against eager float64 references."""

import copy

import pytest
import torch
from conftest import fresh_forward, tiny

from wsvd_passes.compression.calibration import (
    InsertInputObservers,
    RemoveObservers,
    collect_gradients,
    collect_input_stats,
    head_loss,
    next_token_loss,
)
from wsvd_passes.errors import WsvdError
from wsvd_passes.graph.capture import capture_forward
from wsvd_passes.graph.pipeline import Pipeline
from wsvd_passes.graph.sites import find_sites


def _eager_inputs(model, batches, module_name):
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: seen.setdefault(i, []).append(args[0].double()))
             for i, m in enumerate(getattr(layer.self_attn, module_name) for layer in model.model.layers)]
    with torch.no_grad():
        for ids in batches:
            model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    return {i: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) for i, xs in seen.items()}


def test_input_stats_match_float64_reference():
    name = "tiny-llama-gqa"
    batches = [torch.randint(0, 384, (2, 37)), torch.randint(0, 384, (3, 11)), torch.randint(0, 384, (1, 5))]
    stats = collect_input_stats(fresh_forward(name), batches, progress=False)
    model = tiny(name).model
    for i, x in _eager_inputs(model, batches, "q_proj").items():
        got = stats[i].qkv
        assert got.tokens == x.shape[0] == 2 * 37 + 3 * 11 + 5
        torch.testing.assert_close(got.gram, x.T @ x / x.shape[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got.absmean, x.abs().mean(0), atol=1e-6, rtol=1e-6)
        assert got.gram.dtype == torch.float64


def test_observers_are_removed_without_trace():
    captured = fresh_forward("tiny-llama")
    before = captured.gm.code
    Pipeline([InsertInputObservers()])(captured)
    assert "wsvd_observer_0_qkv" in captured.gm.code
    assert len(find_sites(captured.gm)) == 2  # sites are still found through the observers
    Pipeline([RemoveObservers()])(captured)
    assert captured.gm.code == before
    assert not any(n.startswith("wsvd_observer") for n, _ in captured.gm.named_children())


def test_non_finite_statistics_are_reported():
    model = copy.deepcopy(tiny("tiny-llama").model)  # captures share weight storage with the eager model
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("inf")
    with pytest.raises(WsvdError, match=r"layer 0 q/k/v input: calibration statistics contain NaN or inf"):
        collect_input_stats(capture_forward(model), [torch.full((1, 4), 5)], progress=False)


def test_per_sample_gradients_and_fisher_match_eager():
    name = "tiny-qwen2"
    captured = fresh_forward(name)
    site = find_sites(captured.gm)[1]
    targets = [site.k_proj.weight, site.q_proj.weight]
    samples = [torch.randint(0, 384, (n,)) for n in (9, 23, 4)]
    per_sample = []
    fisher = collect_gradients(captured, samples, targets, on_sample=lambda g: per_sample.append(g), progress=False)

    model = tiny(name).model
    attn = model.model.layers[1].self_attn
    expected = []
    for ids in samples:
        model.zero_grad()
        model(ids[None], labels=ids[None], use_cache=False).loss.backward()
        expected.append((attn.k_proj.weight.grad.clone(), attn.q_proj.weight.grad.clone()))
    for got, (gk, gq) in zip(per_sample, expected):
        torch.testing.assert_close(got[targets[0]], gk, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[targets[1]], gq, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fisher[targets[0]], torch.stack([g.square() for g, _ in expected]).mean(0), atol=1e-9, rtol=1e-4)
    assert [p.requires_grad for p in captured.gm.parameters()] == [p.requires_grad for p in fresh_forward(name).gm.parameters()]


def test_next_token_loss_shifts_exactly_once():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    manual = -torch.log_softmax(logits, -1)[:, :-1].gather(2, labels[:, 1:, None]).mean()
    torch.testing.assert_close(next_token_loss(logits, labels), manual)
    # A label shifted by one more position (the classic double shift) gives a different loss.
    assert not torch.allclose(next_token_loss(logits, labels.roll(-1, 1)), manual)


def test_next_token_loss_masks_and_rejects_bad_labels():
    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[1, 2, -100, -100, 3]])
    manual = -torch.log_softmax(logits, -1)[0, [0, 3]].gather(1, torch.tensor([[2], [3]])).mean()
    torch.testing.assert_close(next_token_loss(logits, labels), manual)
    with pytest.raises(WsvdError, match="do not match logits"):
        next_token_loss(logits, labels[:, :4])
    with pytest.raises(WsvdError, match="every label is masked"):
        next_token_loss(logits, torch.full((1, 5), -100))


def _labels(B, S, V):
    labels = torch.randint(0, V, (B, S))
    labels[0, 5:9] = -100
    labels[-1, -1] = -100
    return labels


def test_head_loss_is_next_token_loss_in_chunks_float64():
    torch.manual_seed(0)
    hidden = torch.randn(2, 37, 24, dtype=torch.float64, requires_grad=True)
    head = torch.randn(101, 24, dtype=torch.float64, requires_grad=True)
    labels = _labels(2, 37, 101)
    want = next_token_loss(torch.nn.functional.linear(hidden, head), labels)
    want_grads = torch.autograd.grad(want, [hidden, head])
    got = head_loss(hidden, head, labels, chunk_bytes=7 * 4 * 101)  # 7 positions a chunk: 72 = 10 x 7 + 2
    got_grads = torch.autograd.grad(got, [hidden, head])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    with pytest.raises(WsvdError, match="every label is masked"):
        head_loss(hidden, head, torch.full((2, 37), -100))


def test_head_loss_saves_no_logits():
    """Outside its checkpointed chunks head_loss saves nothing of size V per position for backward (the head
    itself, which lives anyway, aside); the plain loss saves its [N, V] log-softmax."""
    torch.manual_seed(0)
    S, V = 64, 1000
    hidden, head = torch.randn(1, S, 16, requires_grad=True), torch.randn(V, 16)
    labels = _labels(1, S, V)

    def largest_saved(loss_fn) -> int:
        sizes = [0]
        def pack(t):
            if t.untyped_storage().data_ptr() != head.untyped_storage().data_ptr():
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn()
        loss.backward()
        return max(sizes)

    assert largest_saved(lambda: next_token_loss(torch.nn.functional.linear(hidden, head), labels)) >= (S - 1) * V
    assert largest_saved(lambda: head_loss(hidden, head, labels, chunk_bytes=8 * 4 * V)) <= S * 16

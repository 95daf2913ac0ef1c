"""Capture: the exported graphs compute what the eager model computes."""

import pytest
import torch
from conftest import TINY, fresh_forward, tiny, tiny_decode, tiny_forward
from hypothesis import given, settings
from hypothesis import strategies as st

from wsvd_passes.eval.generation import greedy_generate


@pytest.mark.parametrize("name", TINY)
@settings(max_examples=8)
@given(batch=st.integers(1, 5), seq=st.integers(2, 70), seed=st.integers(0, 2**31 - 1))
def test_forward_graph_matches_eager_on_random_shapes(name, batch, seq, seed):
    lm, captured = tiny(name), tiny_forward(name)
    ids = torch.randint(0, lm.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(captured.gm(input_ids=ids), lm.model(ids, use_cache=False).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-qwen2"])
def test_reexport_and_save_load_round_trip(name, tmp_path):
    captured = tiny_forward(name)
    ep = captured.reexport()
    torch.export.save(ep, tmp_path / "graph.pt2")
    loaded = torch.export.load(tmp_path / "graph.pt2").module()
    ids = torch.randint(0, 384, (3, 29))
    with torch.no_grad():
        expected = captured.gm(input_ids=ids)
        torch.testing.assert_close(ep.module()(input_ids=ids), expected, atol=0, rtol=0)
        torch.testing.assert_close(loaded(input_ids=ids), expected, atol=0, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_decode_graph_reproduces_eager_greedy_generation(name):
    lm = tiny(name)
    prompt = torch.randint(3, lm.config.vocab_size, (1, 9))
    ours = greedy_generate(tiny_decode(name), prompt, max_new_tokens=20)
    eager = lm.model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(ours, eager)


def test_decode_step_logits_match_full_forward():
    """Logits of each decode step equal the full-sequence logits at that position."""
    name = "tiny-llama-gqa"
    decoder, ids = tiny_decode(name), torch.randint(0, 384, (1, 13))
    greedy_generate(decoder, ids[:, :1], 0)  # resets the cache
    steps = [decoder.gm(input_ids=ids[:, t : t + 1], cache_position=torch.tensor([t])) for t in range(13)]
    with torch.no_grad():
        full = tiny_forward(name).gm(input_ids=ids)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_generation_beyond_cache_is_refused():
    from wsvd_passes.errors import WsvdError

    with pytest.raises(WsvdError, match="exceed the static cache of 48 positions"):
        greedy_generate(tiny_decode("tiny-llama"), torch.zeros(1, 40, dtype=torch.long), 10)


def test_compress_edits_a_copy_sharing_the_weights_it_leaves_alone():
    # svd-llm factorises q/k/v on a copy that shares the base's parameters: the base graph and its logits
    # are untouched, and the weights the recipe keeps (MLP, o_proj, embeddings) are not duplicated
    from wsvd_passes.algorithms.quantize import parse_bits
    from wsvd_passes.compression.compress import calibrate, compress
    from wsvd_passes.compression.recipes import RECIPES

    base = fresh_forward("tiny-llama-gqa")
    ids = torch.randint(0, 384, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = base.gm(input_ids=ids)
    tensors = {name: (p, p.detach().clone()) for name, p in base.gm.named_parameters()}
    calib = calibrate(base, torch.randint(0, 384, (3, 24), generator=torch.Generator().manual_seed(2)),
                      [RECIPES["svd-llm"]], progress=False)
    compressed, _ = compress(base, calib, RECIPES["svd-llm"], 0.6, parse_bits("w16"))
    with torch.no_grad():
        assert torch.equal(base.gm(input_ids=ids), before)
        assert not torch.allclose(compressed.gm(input_ids=ids), before)
    for name, (p, value) in tensors.items():
        assert dict(base.gm.named_parameters())[name] is p and torch.equal(p, value), name
    kept = dict(compressed.gm.named_parameters())
    shared = [n for n, (p, _) in tensors.items() if n in kept and kept[n] is p]
    assert shared and all(kept[n].data_ptr() == tensors[n][0].data_ptr() for n in shared)
    assert "model.model.layers.0.mlp.up_proj.weight" in shared
    assert "model.model.layers.0.self_attn.q_proj.weight" not in kept  # factorised: replaced, never written into

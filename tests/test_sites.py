"""Attention sites are found from the graph alone, for any Llama-family config."""

import pytest
import torch
from conftest import TINY, tiny, tiny_decode, tiny_forward
from hypothesis import given, settings
from hypothesis import strategies as st

from wsvd_passes.errors import WsvdError
from wsvd_passes.graph.capture import capture_forward
from wsvd_passes.graph.sites import find_sites

aten = torch.ops.aten


def _check_sites(sites, config, *, decode):
    assert len(sites) == config.num_hidden_layers
    head_dim = config.hidden_size // config.num_attention_heads
    for i, s in enumerate(sites):
        assert s.layer == i
        assert (s.n_heads, s.n_kv_heads, s.head_dim, s.hidden_size) == (
            config.num_attention_heads, config.num_key_value_heads, head_dim, config.hidden_size)
        assert f"layers.{i}." in s.q_proj.weight and s.q_proj.weight.endswith("q_proj.weight")
        assert s.k_proj.weight.endswith("k_proj.weight") and s.v_proj.weight.endswith("v_proj.weight")
        assert s.o_proj.weight.endswith("o_proj.weight")
        assert s.attention.target is aten.scaled_dot_product_attention.default
        assert s.q_rope.x.meta["val"].shape[1] == s.n_heads
        assert s.k_rope.x.meta["val"].shape[1] == s.n_kv_heads
        assert (s.k_expand is None) == (s.n_heads == s.n_kv_heads)
        assert s.scale == pytest.approx(head_dim ** -0.5)
        if decode:
            assert s.k_cache.node.target is aten.index_copy_.default and s.k_cache.index is s.v_cache.index
            assert s.k_cache.buffer != s.v_cache.buffer
        else:
            assert s.k_cache is None and s.v_cache is None


@pytest.mark.parametrize("name", TINY)
def test_sites_of_tiny_models(name):
    config = tiny(name).config
    _check_sites(find_sites(tiny_forward(name).gm), config, decode=False)
    _check_sites(find_sites(tiny_decode(name).gm), config, decode=True)


def test_qwen2_projection_biases_are_recorded():
    site = find_sites(tiny_forward("tiny-qwen2").gm)[0]
    assert site.q_proj.bias.endswith("q_proj.bias") and site.o_proj.bias is None


@settings(max_examples=6)
@given(
    kv_heads=st.integers(1, 3), gqa=st.sampled_from([1, 2, 3]), head_dim=st.sampled_from([8, 12, 16]),
    layers=st.integers(1, 3), bias=st.booleans(),
)
def test_sites_of_random_llama_configs(kv_heads, gqa, head_dim, layers, bias):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = kv_heads * gqa
    config = LlamaConfig(vocab_size=64, hidden_size=heads * head_dim, intermediate_size=40, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, attention_bias=bias)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    sites = find_sites(capture_forward(model).gm)
    _check_sites(sites, config, decode=False)
    assert all((s.k_proj.bias is not None) == bias for s in sites)


def test_eager_attention_is_rejected_with_the_fix():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    config._attn_implementation = "eager"
    with pytest.raises(WsvdError, match="no attention found.*attn_implementation='sdpa'"):
        find_sites(capture_forward(LlamaForCausalLM(config).eval()).gm)


def test_model_without_rope_is_rejected_naming_rope():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    config._attn_implementation = "sdpa"
    with pytest.raises(WsvdError, match=r"layer 0 .*no rotate-half rotary embedding \(RoPE\) on the query path"):
        find_sites(capture_forward(GPT2LMHeadModel(config).eval()).gm)


def test_sites_of_smollm2(smollm2, smollm2_forward):
    sites = find_sites(smollm2_forward.gm)
    _check_sites(sites, smollm2.config, decode=False)
    assert (sites[0].n_heads, sites[0].n_kv_heads, sites[0].head_dim) == (9, 3, 64)

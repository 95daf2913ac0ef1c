"""Latent-KV rewrite: the decode graph caches per-head latents and decodes the same tokens."""

import copy

import pytest
import torch
from conftest import tiny, tiny_decode, tiny_forward

from wsvd_passes.compression.compress import calibrate, factor_plan
from wsvd_passes.compression.recipes import RECIPES
from wsvd_passes.errors import WsvdError
from wsvd_passes.eval.generation import greedy_generate, reset_cache
from wsvd_passes.graph.pipeline import Pipeline
from wsvd_passes.graph.sites import find_sites
from wsvd_passes.passes.factorize import FactorizeQKV
from wsvd_passes.passes.latent_kv import LatentKVCache, aligned


def factored_decoder(name, recipe="wsvd-noft", rho1=0.6, max_cache_len=40):
    r = RECIPES[recipe]
    calib = calibrate(tiny_forward(name), torch.randint(0, 384, (4, 40)), [r], progress=False)
    plan, report = factor_plan(calib, r, rho1)
    decoder = copy.deepcopy(tiny_decode(name, max_cache_len))
    Pipeline([FactorizeQKV(plan)])(decoder)
    return decoder, report


def steps(decoder, ids):
    reset_cache(decoder)
    with torch.no_grad():
        return torch.cat([decoder.gm(input_ids=ids[:, t : t + 1], cache_position=torch.tensor([t]))
                          for t in range(ids.shape[1])], 1)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-gqa", "tiny-qwen2"])
def test_latent_cache_decodes_like_the_factored_graph(name):
    if name == "tiny-qwen2":  # k_proj bias: rebuilding biased keys is refused with a clear message
        decoder, _ = factored_decoder(name)
        with pytest.raises(WsvdError, match="k_proj has a bias"):
            Pipeline([LatentKVCache(decoder.config)])(decoder)
        return
    decoder, report = factored_decoder(name)
    ids = torch.randint(3, 300, (1, 15))
    before, tokens_before = steps(decoder, ids), greedy_generate(decoder, ids[:, :5], 25)
    rewrite = LatentKVCache(decoder.config)
    Pipeline([rewrite])(decoder)
    torch.testing.assert_close(steps(decoder, ids), before, atol=2e-5, rtol=1e-5)
    assert torch.equal(greedy_generate(decoder, ids[:, :5], 25), tokens_before)

    sites = find_sites(decoder.gm)
    assert all(s.latent_kv and s.v_proj.up is None for s in sites)
    buffers = dict(decoder.gm.named_buffers())
    assert not any(k.startswith(("key_cache", "value_cache")) for k in buffers)  # dense caches are gone
    s = sites[0]
    ck = buffers[s.k_cache.buffer]
    r_k = max(report.ranks[0]["k"])
    assert ck.shape == (1, s.n_kv_heads, 40, aligned(r_k)) and aligned(r_k) % 16 == 0 and r_k <= aligned(r_k) < r_k + 16
    padded = sum(aligned(max(report.ranks[i]["k"])) + aligned(max(report.ranks[i]["v"])) for i in range(len(sites)))
    assert rewrite.bytes.latent / rewrite.bytes.dense == pytest.approx(padded / (2 * len(sites) * s.head_dim))
    assert rewrite.bytes.ratio <= 1.0
    ep = decoder.reexport()  # survives re-export with its latent buffers
    assert any(k.endswith("k_latent_cache") for k in ep.state_dict) or any(
        k.endswith("k_latent_cache") for k in ep.constants)


@pytest.mark.parametrize("recipe", ["qsvd-noq", "svd-llm"])
def test_shared_latents_decode_like_the_factored_graph(recipe):
    """Joint factors cache their one shared latent; per-projection factors cache K and V latents whole."""
    decoder, report = factored_decoder("tiny-llama-gqa", recipe=recipe)
    ids = torch.randint(3, 300, (1, 11))
    before = steps(decoder, ids)
    rewrite = LatentKVCache(decoder.config)
    Pipeline([rewrite])(decoder)
    torch.testing.assert_close(steps(decoder, ids), before, atol=2e-5, rtol=1e-5)
    site = find_sites(decoder.gm)[0]
    cache = dict(decoder.gm.named_buffers())[site.k_cache.buffer]
    if recipe == "qsvd-noq":
        assert site.k_cache.buffer == site.v_cache.buffer and cache.shape == (1, 1, 40, aligned(report.ranks[0]["qkv"][0]))
    else:
        assert site.k_cache.buffer != site.v_cache.buffer and cache.shape == (1, 1, 40, aligned(report.ranks[0]["k"][0]))


def test_latent_rewrite_refuses_what_it_cannot_do():
    with pytest.raises(WsvdError, match="K and V are not factored"):
        Pipeline([LatentKVCache(tiny("tiny-llama").config)])(copy.deepcopy(tiny_decode("tiny-llama")))
    forward = copy.deepcopy(tiny_forward("tiny-llama"))
    with pytest.raises(WsvdError, match="needs the decode graph"):
        Pipeline([LatentKVCache(forward.config)])(forward)

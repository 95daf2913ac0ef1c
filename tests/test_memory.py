"""Resident-memory helpers of whole-model compression (Linux: they read /proc/self/maps)."""

import sys

import pytest
import torch
import transformers

from wsvd_passes.compression.memory import own_weights

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def _mapped(path) -> bool:
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().endswith(str(path)) for line in maps)


def test_own_weights_drops_the_checkpoint_mapping_and_keeps_values_and_ties(tmp_path):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    file = (tmp_path / "model.safetensors").resolve()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert _mapped(file)  # transformers maps the checkpoint; its tensors are views of the mapping
    own_weights(model)
    assert not _mapped(file)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        model(ids)  # still a working model

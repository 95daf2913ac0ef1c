"""Model loading: registry names, local checkpoints and the embedded SmolLM2."""

import pytest
import torch
from conftest import tiny

from wsvd_passes.errors import WsvdError
from wsvd_passes.eval.generation import greedy_generate
from wsvd_passes.graph.capture import capture_decode
from wsvd_passes.models.registry import load_model


def test_tiny_models_are_seeded_and_reproducible():
    a, b = load_model("tiny-llama-gqa"), load_model("tiny-llama-gqa")
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert not torch.equal(load_model("tiny-llama-gqa", seed=1).model.lm_head.weight, a.model.lm_head.weight)


def test_local_checkpoint_path_round_trip(tmp_path):
    lm = tiny("tiny-qwen2")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    ids = torch.randint(0, 384, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, lm.model(ids).logits, atol=0, rtol=0)
    assert loaded.model.config._attn_implementation == "sdpa"


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(WsvdError, match="has no config.json"):
        load_model(str(tmp_path))


@pytest.mark.slow  # 22 s
def test_smollm2_greedy_generation_through_decode_graph(smollm2):
    prompt = smollm2.tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    decoder = capture_decode(smollm2.model, max_cache_len=64)
    ours = greedy_generate(decoder, prompt, max_new_tokens=16)
    eager = smollm2.model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert torch.equal(ours, eager)
    assert smollm2.tokenizer.decode(ours[0, prompt.shape[1]:]).startswith(" Berlin.")


def test_smollm2_forward_graph_perplexity_matches_hf(smollm2, smollm2_forward):
    from wsvd_passes.eval.data import pydoc_text, token_windows
    from wsvd_passes.eval.evaluation import evaluate

    windows = token_windows(smollm2.tokenizer, pydoc_text("evaluation"), 128, max_windows=4)
    result = evaluate(lambda ids: smollm2_forward.gm(input_ids=ids), windows, progress=False)
    with torch.no_grad():
        hf_loss = smollm2.model(windows, labels=windows, use_cache=False).loss
    assert result.nll == pytest.approx(hf_loss.item(), rel=1e-5)
    assert smollm2.config.num_hidden_layers == 30 and smollm2.config.tie_word_embeddings

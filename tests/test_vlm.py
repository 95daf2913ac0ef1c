"""Vision-language models: decoder capture, every recipe, latent KV + lowering, answer-only labels,
the multiple-choice evaluator and the CLI, on the tiny config of each family."""

import copy
import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny, tiny_forward

import lowering
from wsvd_passes.algorithms.quantize import parse_bits
from wsvd_passes.cli import main
from wsvd_passes.compression.calibration import next_token_loss
from wsvd_passes.compression.compress import calibrate, compress, factor_plan
from wsvd_passes.compression.recipes import RECIPES
from wsvd_passes.errors import WsvdError
from wsvd_passes.eval.evaluation import evaluate
from wsvd_passes.eval.generation import reset_cache
from wsvd_passes.eval.mm_data import check_labels, image_text_samples, load_items, sample_items
from wsvd_passes.eval.multiple_choice import prepare, score
from wsvd_passes.eval.topk import top_k
from wsvd_passes.graph.capture import capture_decode, capture_forward
from wsvd_passes.graph.pipeline import Pipeline
from wsvd_passes.graph.sites import find_sites
from wsvd_passes.models.registry import load_model
from wsvd_passes.models.vlm import VLM_NAMES, decoder_inputs
from wsvd_passes.passes.factorize import FactorizeQKV
from wsvd_passes.passes.heal import LogitKL, kl_loss
from wsvd_passes.passes.latent_kv import LatentKVCache

DATA = Path(__file__).parent / "data" / "mc_synthetic" / "data.jsonl"
CACHED = ["tiny-llava", "tiny-llava-next", "tiny-smolvlm"]  # 1-D RoPE: static-cache decode graph
# Every recipe, with few fine-tuning / QAT steps (the optimisers are tested elsewhere).
TEST_RECIPES = {name: dataclasses.replace(r, finetune_steps=3, qat_steps=2, heal_steps=min(r.heal_steps, 2))
                for name, r in RECIPES.items()}


@functools.cache
def samples(name, n=2):
    return image_text_samples(tiny(name), load_items(DATA)[:n])


@functools.cache
def calibration(name):
    return calibrate(tiny_forward(name), list(samples(name)), list(TEST_RECIPES.values()), progress=False)


def _graph_kwargs(sample):
    return {k: v for k, v in sample.items() if k != "labels"}


@pytest.mark.parametrize("name", VLM_NAMES)
def test_decoder_graph_reproduces_the_vlm_on_image_and_text(name):
    lm = tiny(name)
    item = load_items(DATA)[1]
    from wsvd_passes.eval.mm_data import _image, prompt_text

    processed = lm.processor(text=prompt_text(lm.processor, item), images=[_image(item)], return_tensors="pt")
    inputs = decoder_inputs(lm.model, processed)
    assert (inputs.input_ids == lm.model.config.image_token_id).sum() >= 4  # image features entered as embeddings
    with torch.no_grad():
        expected = lm.model(**processed).logits
        torch.testing.assert_close(tiny_forward(name).gm(**inputs.kwargs), expected, atol=1e-5, rtol=1e-5)
    sites = find_sites(tiny_forward(name).gm)
    assert len(sites) == 2 and (sites[0].n_heads, sites[0].n_kv_heads, sites[0].head_dim) == (6, 2, 16)
    assert all(".vision" not in s.module_path and "vision_tower" not in s.module_path for s in sites)
    assert ("position_ids" in tiny_forward(name).example_kwargs) == (name == "tiny-qwen2-vl")


@pytest.mark.parametrize("name", VLM_NAMES)
def test_every_recipe_runs_and_full_rank_factors_reproduce_the_logits(name):
    calib, base = calibration(name), tiny_forward(name)
    sample = _graph_kwargs(samples(name)[0])
    with torch.no_grad():
        expected = base.gm(**sample)
    for recipe in TEST_RECIPES.values():
        if recipe.factor:
            plan, _ = factor_plan(calib, dataclasses.replace(recipe, finetune=False), None)  # Adam steps move exact factors
            exact = copy.deepcopy(base)
            Pipeline([FactorizeQKV(plan)])(exact)
            with torch.no_grad():
                torch.testing.assert_close(exact.gm(**sample), expected, atol=2e-4, rtol=1e-4, msg=recipe.name)
        # the weight clip search is slow: quantise for real once (full wsvd recipe on SmolVLM), else w16a16
        bits = parse_bits("w8a8" if (recipe.name, name) == ("wsvd", "tiny-smolvlm") else "w16a16")
        compressed, _ = compress(base, calib, recipe, 0.6 if recipe.factor else None, bits)
        with torch.no_grad():
            out = compressed.gm(**sample)
        assert out.shape == expected.shape and torch.isfinite(out).all(), recipe.name


@pytest.mark.parametrize("k", [0, 5])
def test_heal_teacher_keeps_image_text_samples_whole_and_scores_exactly(k):
    """LogitKL on image-text kwargs: the teacher memoised per sample (top k + tail, or the logits at k = 0), the loss
    over the supervised positions only, the score the exact KL."""
    base, (sample, other) = tiny_forward("tiny-llava"), samples("tiny-llava")
    name = "lm_head.weight"  # a student with a sharper head: the random tiny model's distributions are near uniform
    tensors = {name: dict(base.gm.named_parameters())[name].detach() * 20}
    objective = LogitKL(base, teacher_topk=k)
    loss = objective.loss(base.gm, tensors, sample, torch.device("cpu"))
    objective.loss(base.gm, tensors, sample, torch.device("cpu"))  # memoised: one entry per sample
    with torch.no_grad():
        dense = base.gm(**_graph_kwargs(sample))
        student = torch.func.functional_call(base.gm, tensors, kwargs=_graph_kwargs(sample), strict=False,
                                             tie_weights=False)
    (kept,) = objective.teacher.memo.values()
    assert (kept.logp.shape[-1] == k) if k else torch.equal(kept, dense)
    expected = kl_loss(top_k(dense, k) if k else dense, student, sample["labels"])
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-7)
    assert 0 < float(loss)
    with torch.no_grad():
        gm = copy.deepcopy(base.gm)
        dict(gm.named_parameters())[name].mul_(20)
    exact = evaluate(lambda x: gm(**x), [other], reference=lambda x: base.gm(**x), progress=False).kl
    assert objective.scorer(torch.device("cpu"), 1)(gm, [other]) == pytest.approx(exact, rel=1e-9)


def _steps(decoder, embeds):
    reset_cache(decoder)
    with torch.no_grad():
        return torch.cat([decoder.gm(inputs_embeds=embeds[:, t : t + 1], cache_position=torch.tensor([t]))
                          for t in range(embeds.shape[1])], 1)


@pytest.mark.parametrize("name", CACHED)
def test_latent_cache_and_lowering_decode_image_and_text(name):
    lm, sample = tiny(name), _graph_kwargs(samples(name)[0])
    embeds = sample["inputs_embeds"]
    decoder = capture_decode(lm.model, max_cache_len=embeds.shape[1] + 2)
    with torch.no_grad():
        torch.testing.assert_close(_steps(decoder, embeds), tiny_forward(name).gm(**sample), atol=2e-5, rtol=1e-5)
    plan, _ = factor_plan(calibration(name), TEST_RECIPES["wsvd-noft"], 0.6)
    Pipeline([FactorizeQKV(plan)])(decoder)
    factored = _steps(decoder, embeds)
    Pipeline([LatentKVCache(decoder.config)])(decoder)
    assert all(s.latent_kv for s in find_sites(decoder.gm))
    torch.testing.assert_close(_steps(decoder, embeds), factored, atol=5e-5, rtol=1e-5)
    lowered = lowering.lower(decoder)
    assert len([n for n in lowered.gm.graph.nodes if n.target is torch.ops.wsvd.latent_attention.default]) == 2
    torch.testing.assert_close(_steps(lowered, embeds), factored, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("extra, message", [
    ({"deepstack_visual_embeds": [torch.zeros(4, 96)]}, "feeds its language decoder 'deepstack_visual_embeds'"),
    ({"attention_mask": torch.tensor([[0] + [1] * 137])}, "attention_mask has zeros")])
def test_decoder_inputs_the_graph_would_drop_are_refused(extra, message):
    """A VLM whose decoder takes more than the graph's inputs (Qwen3-VL's deepstack features) or a padded sample would
    silently compute something else: refused in one line."""
    lm = tiny("tiny-llava")
    from wsvd_passes.eval.mm_data import _image, prompt_text

    item = load_items(DATA)[1]
    processed = lm.processor(text=prompt_text(lm.processor, item), images=[_image(item)], return_tensors="pt")
    handle = lm.model.get_decoder().register_forward_pre_hook(lambda m, a, k: (a, {**k, **extra}), with_kwargs=True)
    try:
        with pytest.raises(WsvdError, match=message):
            decoder_inputs(lm.model, processed)
    finally:
        handle.remove()
    assert decoder_inputs(lm.model, processed).kwargs["inputs_embeds"].shape[1] == 138


def test_multimodal_rope_is_refused_where_positions_are_1d():
    lm = tiny("tiny-qwen2-vl")
    with pytest.raises(WsvdError, match="multimodal RoPE"):
        capture_decode(lm.model)
    with pytest.raises(WsvdError, match="multimodal RoPE .* latent-KV rewrite does not support it"):
        LatentKVCache(tiny_forward("tiny-qwen2-vl").config)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_only_answer_tokens_carry_loss_shifted_once(name):
    sample = samples(name)[0]
    labels = sample["labels"]
    supervised = (labels != -100).nonzero()[:, 1]
    first, S = int(supervised[0]), labels.shape[1]
    assert supervised.tolist() == list(range(first, S))  # the answer and end-of-turn tokens, at the end
    logits = tiny_forward(name).gm(**_graph_kwargs(sample)).detach().requires_grad_(True)
    loss = next_token_loss(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    touched = grad.abs().sum(-1)[0].nonzero()[:, 0]
    assert touched.tolist() == list(range(first - 1, S - 1))  # logits at t predict labels[t + 1]
    manual = torch.nn.functional.cross_entropy(logits[0, first - 1 : S - 1].double(), labels[0, first:])
    torch.testing.assert_close(loss.double(), manual, atol=1e-6, rtol=1e-6)


def test_misaligned_labels_are_caught():
    lm = tiny("tiny-llava")
    item = load_items(DATA)[0]
    from wsvd_passes.eval.mm_data import _image, prompt_text

    processed = lm.processor(text=prompt_text(lm.processor, item) + "C<|end|>", images=[_image(item)],
                             return_tensors="pt")
    ids = processed["input_ids"]
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    check_labels(ids, labels)
    shifted = torch.full_like(ids, -100)
    shifted[:, -3:-1] = ids[:, -2:]  # pre-shifted: would be shifted a second time by next_token_loss
    with pytest.raises(WsvdError, match="labels must be the unshifted input ids"):
        check_labels(ids, shifted)
    image = ids == lm.model.config.image_token_id
    with pytest.raises(WsvdError, match="image token is supervised"):
        check_labels(ids, torch.where(image, ids, labels), image_token_id=lm.model.config.image_token_id)


def test_multiple_choice_accuracy_is_reproducible_bit_for_bit():
    def run():
        lm = load_model("tiny-llava", seed=3)
        items = sample_items(load_items(DATA), 6, seed=11)
        graph = capture_forward(lm.model)
        result = score(lambda kw: graph.gm(**kw), prepare(lm, items), model=lm.model, tokenizer=lm.tokenizer,
                       max_new_tokens=2)
        return json.dumps(result.as_dict(), sort_keys=True)

    first, second = run(), run()
    assert first == second
    result = json.loads(first)
    assert result["total"] == 6 and result["correct"] == sum(r["correct"] for r in result["items"])
    assert [r["id"] for r in result["items"]] == [i.id for i in sample_items(load_items(DATA), 6, seed=11)]
    assert all(set(r["letter_logprobs"]) == {"A", "B", "C"} and "generated" in r for r in result["items"])


@pytest.mark.parametrize("record, message", [
    ("not json", "is not valid JSON"),
    ({"image": "IMG", "question": "q"}, "lacks the string field 'answer'"),
    ({"image": "missing.png", "question": "q", "answer": "a"}, "does not exist"),
    ({"image": "IMG", "question": "q", "options": ["x", "y"], "answer": "C"}, "not one of the option letters"),
])
def test_bad_jsonl_gives_one_line(tmp_path, record, message):
    if isinstance(record, dict) and record["image"] == "IMG":
        record = dict(record, image=str(DATA.parent / "images" / "00.png"))
    path = tmp_path / "bad.jsonl"
    path.write_text((record if isinstance(record, str) else json.dumps(record)) + "\n")
    with pytest.raises(WsvdError, match=message) as e:
        load_items(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["tiny-llava-next", "tiny-qwen2-vl"])
def test_local_checkpoint_with_its_processor(name, tmp_path):
    lm = tiny(name)
    lm.model.save_pretrained(tmp_path)
    lm.processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.processor is not None and type(loaded.model) is type(lm.model)
    a = image_text_samples(lm, load_items(DATA)[:1])[0]
    b = image_text_samples(loaded, load_items(DATA)[:1])[0]
    assert torch.equal(a["labels"], b["labels"])
    with torch.no_grad():
        torch.testing.assert_close(capture_forward(loaded.model).gm(**_graph_kwargs(b)),
                                   tiny_forward(name).gm(**_graph_kwargs(a)), atol=1e-5, rtol=1e-5)


def test_cli_compress_with_image_text_calibration_then_multiple_choice_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["compress", "--model", "tiny-smolvlm", "--recipe", "wsvd-noq", "--rho1", "0.6", "--calib", str(DATA),
                 "--calib-samples", "4", "--out", str(out), "--quiet"]) == 0
    report = tmp_path / "mc.json"
    assert main(["eval", "--model", "tiny-smolvlm", "--artifact", str(out), "--mc", str(DATA), "--quiet",
                 "--json", str(report)]) == 0
    results = json.loads(report.read_text())["results"]
    assert set(results) == {"uncompressed", "compressed"}
    assert results["uncompressed"]["total"] == 8 and 0 <= results["compressed"]["agreement"] <= 1
    assert "uncompressed" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["compress", "--model", "tiny-llava", "--recipe", "wsvd-noq", "--rho1", "0.5", "--out", "x"], "give image-text calibration data with --calib"),
    (["compress", "--model", "tiny-llama", "--recipe", "wsvd-noq", "--rho1", "0.5", "--out", "x", "--calib", str(DATA)], "is a text-only model"),
    (["eval", "--model", "tiny-llava"], "use `wsvd eval --mc data.jsonl`"),
    (["eval", "--model", "tiny-llava", "--mc", "/nonexistent.jsonl"], "does not exist"),
])
def test_cli_refusals_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1

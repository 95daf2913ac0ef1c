"""Low-rank factorisation: exactness at full rank, monotone error, graph structure, accounting."""

import copy
import math

import pytest
import torch
from conftest import fresh_forward
from hypothesis import given, settings
from hypothesis import strategies as st

from wsvd_passes.algorithms.lowrank import make_scaling, svd_group, whitening_factor
from wsvd_passes.compression.calibration import InputStats
from wsvd_passes.compression.compress import calibrate, factor_plan, layer_groups
from wsvd_passes.compression.recipes import RECIPES
from wsvd_passes.errors import WsvdError
from wsvd_passes.graph.capture import capture_forward
from wsvd_passes.graph.pipeline import Pipeline, same_function
from wsvd_passes.graph.sites import find_sites
from wsvd_passes.passes.factorize import FactorizeQKV

aten = torch.ops.aten


def _factored(captured, calib, recipe, rho1):
    out = copy.deepcopy(captured)
    plan, report = factor_plan(calib, recipe, rho1)
    Pipeline([FactorizeQKV(plan)])(out)
    return out, report


@settings(max_examples=5)
@given(kv_heads=st.integers(1, 3), gqa=st.sampled_from([1, 2, 3]), head_dim=st.sampled_from([6, 8, 10]),
       bias=st.booleans(), seed=st.integers(0, 1000))
def test_full_rank_factorisation_reproduces_logits_for_every_recipe(kv_heads, gqa, head_dim, bias, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = kv_heads * gqa
    config = LlamaConfig(vocab_size=64, hidden_size=heads * head_dim, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, attention_bias=bias)
    config._attn_implementation = "sdpa"
    captured = capture_forward(LlamaForCausalLM(config).eval())
    factoring = [r for r in RECIPES.values() if r.factor and not r.qat]  # QAT would also rotate (needs Hadamard sizes)
    calib = calibrate(captured, torch.randint(0, 64, (6, 33)), factoring, progress=False)
    inputs = [{"input_ids": torch.randint(0, 64, (2, 19))}, {"input_ids": torch.randint(0, 64, (1, 7))}]
    for recipe in factoring:  # at full rank Fisher fine-tuning starts (and stays) at zero error
        factored, report = _factored(captured, calib, recipe, None)
        assert all(s.q_proj.factored and s.k_proj.factored and s.v_proj.factored for s in find_sites(factored.gm))
        same_function(factored.gm, captured.gm, inputs, atol=1e-4, rtol=1e-4)


@settings(max_examples=20)
@given(m=st.integers(2, 12), e=st.integers(3, 17), scaling=st.sampled_from(["none", "asvd", "whiten"]),
       seed=st.integers(0, 10**6))
def test_truncation_error_is_eckart_young_and_non_increasing_in_rank(m, e, scaling, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, e, generator=g, dtype=torch.float64)
    X = torch.randn(4 * e, e, generator=g, dtype=torch.float64) * torch.rand(e, generator=g, dtype=torch.float64)
    stats = InputStats(X.T @ X / len(X), X.abs().mean(0), len(X))
    group = svd_group(0, "k", None, W, make_scaling(stats, scaling, e))
    errors = []
    for r in range(len(group.sigma) + 1):
        up, down = group.factors(torch.arange(r))
        diff = (W - up @ down) @ group.scaling.S  # error in the scaled coordinates
        errors.append(float(diff.norm()))
        assert errors[-1] == pytest.approx(float(group.sigma[r:].square().sum().sqrt()), abs=1e-8)
        if scaling == "whiten":  # scaled error is exactly the output error on the calibration inputs
            assert errors[-1] == pytest.approx(float((X @ (W - up @ down).T).norm() / math.sqrt(len(X))), abs=1e-8)
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-9


def test_joint_factorisation_has_one_shared_down_projection_per_layer():
    name = "tiny-llama-gqa"
    captured = fresh_forward(name)
    calib = calibrate(captured, torch.randint(0, 384, (4, 40)), [RECIPES["qsvd-noq"]], progress=False)
    factored, _ = _factored(captured, calib, RECIPES["qsvd-noq"], 0.6)
    gm = factored.gm
    for site in find_sites(gm):
        assert site.q_proj.latent is site.k_proj.latent is site.v_proj.latent
        downs = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith(site.module_path + ".wsvd")
                 and n.target.endswith("_down")]
        assert [n.target.rpartition(".")[2] for n in downs] == ["qkv_down"]
        linears = [n for n in gm.graph.nodes if n.target is aten.linear.default and n.args[1] in downs]
        assert len(linears) == 1
    assert not any(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")) for k in gm.state_dict())


def test_per_head_factors_are_block_diagonal_with_padded_ranks():
    name = "tiny-llama-gqa"
    captured = fresh_forward(name)
    calib = calibrate(captured, torch.randint(0, 384, (4, 40)), [RECIPES["wsvd-noft"]], progress=False)
    factored, report = _factored(captured, calib, RECIPES["wsvd-noft"], 0.5)
    site = find_sites(factored.gm)[0]
    assert site.k_proj.latent is not site.v_proj.latent
    D = factored.gm.get_parameter(site.k_proj.down)
    U = factored.gm.get_parameter(site.k_proj.up)
    ranks = factored.gm.get_buffer(site.k_proj.up.replace("k_up", "k_ranks")).tolist()
    assert ranks == report.ranks[0]["k"] and len(ranks) == site.n_kv_heads
    r_max = max(ranks)
    assert D.shape == (site.n_kv_heads * r_max, site.hidden_size)
    for h, r in enumerate(ranks):
        block = U[h * site.head_dim : (h + 1) * site.head_dim]
        assert torch.count_nonzero(block[:, : h * r_max]) == 0 and torch.count_nonzero(block[:, (h + 1) * r_max :]) == 0
        assert torch.count_nonzero(D[h * r_max + r : (h + 1) * r_max]) == 0  # padding rows
    ep = factored.reexport()  # the factored graph re-exports and keeps its pattern
    assert find_sites(ep.module())[0].k_proj.factored


def test_ranks_above_the_head_dim_are_refused():
    from wsvd_passes.passes.factorize import LayerFactors, pad_heads

    captured = fresh_forward("tiny-llama-gqa")
    site = find_sites(captured.gm)[0]
    D, E = site.head_dim, site.hidden_size
    heads = {"q": site.n_heads, "k": site.n_kv_heads, "v": site.n_kv_heads}
    ranks = {p: [D] * n for p, n in heads.items()}
    ranks["k"][1] = D + 1
    downs, ups = {}, {}
    for p, n in heads.items():
        downs[p], ups[p] = pad_heads([torch.randn(D, r) for r in ranks[p]], [torch.randn(r, E) for r in ranks[p]])
    plan = {0: LayerFactors("head", downs, ups, {p: p for p in heads}, ranks)}
    with pytest.raises(WsvdError, match=rf"FactorizeQKV: layer 0 k: rank {D + 1} is outside \[0, {D}\] .*the head dim"):
        Pipeline([FactorizeQKV(plan)])(captured)


def test_rank_accounting_matches_the_paper_formulas():
    name = "tiny-llama"  # 3 heads, head dim 32, hidden 96
    captured = fresh_forward(name)
    calib = calibrate(captured, torch.randint(0, 384, (4, 40)), [RECIPES["wsvd-noft"], RECIPES["svd"]], progress=False)
    E, H = 96, 32
    # Uniform per-head rank r: rho1 = (1 + H/E) r / H, rho2 = r / H.
    from wsvd_passes.compression.recipes import Recipe

    uniform_heads = Recipe("u", "head", "whiten", "uniform")
    _, report = factor_plan(calib, uniform_heads, 0.5)
    r = math.floor(0.5 * E * H / (E + H))
    assert report.ranks[0]["k"] == [r] * 3
    assert report.rho1 == pytest.approx((1 + H / E) * r / H)
    assert report.rho2 == pytest.approx(r / H)
    assert report.rho1_per_layer == pytest.approx([report.rho1] * 2) and report.rho2_per_layer == pytest.approx([r / H] * 2)
    _, report = factor_plan(calib, RECIPES["svd"], 0.5)
    r_k = math.floor(0.5 * E * 96 / (E + 96))
    assert report.ranks[0]["k"] == [r_k] and report.rho2 == pytest.approx(2 * r_k / (2 * 96))


def test_calibration_keeps_group_shapes_only_and_the_plan_makes_each_layers_groups_again_bit_for_bit():
    """The calibration holds no float64 group matrices; factor_plan makes each layer's again from its weights and
    statistics, with the spectra that ranked them (so the kept components are the ones allocated)."""
    captured = fresh_forward("tiny-llama-gqa")
    recipe = RECIPES["wsvd-noq"]
    calib = calibrate(captured, torch.randint(0, 384, (4, 40)), [recipe], progress=False)
    groups = calib.groups[(recipe.granularity, recipe.scaling)]
    assert all(g.source.is_meta and g.U.is_meta and g.Vh.is_meta and g.scaling is None for g in groups)
    for i, site in enumerate(calib.sites):
        again = layer_groups(site, calib.weights[site.layer], calib.stats[i], [recipe])[(recipe.granularity, recipe.scaling)]
        kept = [g for g in groups if g.layer == site.layer]
        assert [g.key for g in again] == [g.key for g in kept]
        assert all(torch.equal(a.sigma, k.sigma) for a, k in zip(again, kept, strict=True))
    first, report = factor_plan(calib, recipe, 0.5)
    second, report_again = factor_plan(calib, recipe, 0.5)
    assert report_again.as_dict() == report.as_dict()
    for layer, factors in first.items():
        for p in "qkv":
            assert torch.equal(second[layer].downs[p], factors.downs[p]) and torch.equal(second[layer].ups[p], factors.ups[p])


def test_whitening_jitter_fallback_and_failure():
    gram = torch.zeros(4, 4, dtype=torch.float64)
    gram[0, 0] = gram[1, 1] = 1.0  # rank 2: not positive definite
    with pytest.warns(UserWarning, match="layer 3: Gram matrix is not positive definite; added jitter"):
        L = whitening_factor(gram, where="layer 3")
    assert torch.allclose(L @ L.T, gram, atol=1e-6)
    with pytest.raises(WsvdError, match="cannot be whitened"):
        whitening_factor(torch.full((3, 3), float("nan"), dtype=torch.float64), where="layer 0")


def test_unknown_recipe_and_bad_rho1_are_refused(capsys):
    from wsvd_passes.cli import main

    assert main(["table", "--model", "tiny-llama", "--recipes", "nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    assert main(["table", "--model", "tiny-llama", "--rho1", "0.5,1.5"]) == 2
    assert "rho1 1.5 is outside (0, 1]" in capsys.readouterr().err
    assert main(["table", "--model", "tiny-llama", "--eval-windows", "0"]) == 2
    assert "--eval-windows 0 must be at least 1" in capsys.readouterr().err


def test_compress_and_table_commands(tmp_path, capsys):
    import json

    from wsvd_passes.cli import main

    out = tmp_path / "art"
    args = ["--model", "tiny-llama-gqa", "--calib-windows", "4", "--seq-len", "48", "--quiet"]
    assert main(["compress", *args, "--recipe", "wsvd-noq", "--rho1", "0.6", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == "wsvd-noq" and 0.5 < manifest["rho1"] <= 0.6
    assert manifest["calibration"]["windows"] == 4 and len(manifest["calibration"]["sha256"]) == 64
    assert manifest["finetune"]["loss_after"] < manifest["finetune"]["loss_before"]
    from safetensors.torch import load_file

    assert any(k.endswith("wsvd.k_down") for k in load_file(out / "weights.safetensors"))
    assert main(["eval", "--artifact", str(out), "--seq-len", "48", "--max-windows", "2", "--quiet"]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["kl"] > 0 and 0 < evaluation["top1"] < 1 and evaluation["ref_ppl"] != evaluation["ppl"]
    assert main(["report", str(out)]) == 0 and "| wsvd-noq |" in (out / "report.md").read_text()
    generated = tmp_path / "g.json"
    assert main(["generate", "--artifact", str(out), "--prompt", "The cat", "--max-new-tokens", "4", "--no-compile",
                 "--json", str(generated)]) == 0
    result = json.loads(generated.read_text())
    assert "lowered to wsvd::latent_attention" in result["path"] and len(result["tokens"]) > 4

    table = tmp_path / "t.json"
    assert main(["table", *args, "--recipes", "svd,wsvd-noft", "--rho1", "0.9,0.5", "--eval-windows", "2",
                 "--json", str(table)]) == 0
    rows = json.loads(table.read_text())
    assert [(r["recipe"], r["rho1"]) for r in rows] == [("fp", 1.0), ("svd", 0.9), ("svd", 0.5), ("wsvd-noft", 0.9),
                                                        ("wsvd-noft", 0.5)]
    assert all({"rho2", "bits", "ppl", "kl", "top1"} <= set(r) for r in rows)
    assert rows[0]["kl"] == 0 and rows[0]["top1"] == 1
    assert all(r["kl"] >= 0 and 0 <= r["top1"] <= 1 for r in rows[1:]) and rows[2]["kl"] > 0
    assert rows[2]["rho1_achieved"] < rows[1]["rho1_achieved"]


@pytest.mark.slow  # 35 s: SmolLM2's 30 layers factorised
def test_smollm2_full_rank_per_head_factors_reproduce_logits_and_half_rank_stays_usable(smollm2, smollm2_forward):
    from wsvd_passes.eval.data import pydoc_text, token_windows
    from wsvd_passes.eval.evaluation import evaluate

    calib_windows = token_windows(smollm2.tokenizer, pydoc_text("calibration"), 128, max_windows=4)
    recipe = RECIPES["wsvd-noft"]
    calib = calibrate(copy.deepcopy(smollm2_forward), calib_windows, [recipe], progress=False)
    windows = token_windows(smollm2.tokenizer, pydoc_text("evaluation"), 128, max_windows=2)
    full, _ = _factored(smollm2_forward, calib, recipe, None)
    same_function(full.gm, smollm2_forward.gm, [{"input_ids": windows}], atol=2e-3, rtol=1e-3)
    half, report = _factored(smollm2_forward, calib, recipe, 0.5)
    fp = lambda ids: smollm2_forward.gm(input_ids=ids)  # noqa: E731
    result = evaluate(lambda ids: half.gm(input_ids=ids), windows, reference=fp, progress=False)
    assert report.rho1 <= 0.5 and result.top1 > 0.5 and result.kl < 1.0  # plain SVD collapses (KL ~7.6)

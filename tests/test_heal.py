"""End-to-end healing: KL goes down on calibration windows, padding and other weights stay put,
validation and evaluation data stay out of training, the quantised graph trains through its
quantisers, artifacts reload the healed model exactly."""

import copy
import dataclasses
import functools
import itertools

import pytest
import torch

from wsvd_passes.algorithms.lowrank import PROJECTIONS
from wsvd_passes.algorithms.quantize import fake_quant_activation, fake_quant_weight, parse_bits
from wsvd_passes.artifacts import artifact
from wsvd_passes.cli import main
from wsvd_passes.compression.compress import calibrate, compress, factor_plan
from wsvd_passes.compression.recipes import RECIPES
from wsvd_passes.errors import WsvdError
from wsvd_passes.eval.data import pydoc_text, token_windows
from wsvd_passes.eval.evaluation import MemoLogits, evaluate
from wsvd_passes.eval.topk import TopK, top_k
from wsvd_passes.graph.capture import capture_forward
from wsvd_passes.graph.factor_spec import factor_spec
from wsvd_passes.graph.graph_utils import tensor_attr
from wsvd_passes.graph.pipeline import Pipeline
from wsvd_passes.graph.quant_spec import quantized_weights
from wsvd_passes.graph.sites import find_sites
from wsvd_passes.models.registry import load_model
from wsvd_passes.passes import heal
from wsvd_passes.passes.factorize import FactorizeQKV

MODEL = "tiny-llama-gqa"
STEPS = 20
LR = 2e-5  # peak rate for this tiny model (the recipes' default is chosen on SmolLM2's validation KL)
RHO1 = 0.5  # per-head ranks differ (1 to 10 of 16): lower-rank heads are zero-padded


@functools.cache
def _model():
    """tiny-llama-gqa with its LM head scaled up: a random tiny model's next-token distributions are
    nearly uniform (KL of any compression ~1e-5); peaked ones make the healing signal measurable."""
    lm = load_model(MODEL)
    with torch.no_grad():
        lm.model.lm_head.weight.mul_(30)
    return lm


@functools.cache
def _base():
    return capture_forward(_model().model)


@functools.cache
def _windows():
    return token_windows(_model().tokenizer, pydoc_text("calibration"), 32, 24)


@functools.cache
def _calibration():
    return calibrate(_base(), _windows(), [RECIPES["wsvd-heal"], RECIPES["wsvd-heal-noq"]], progress=False)


@functools.cache
def _compressed(recipe: str, bits: str, steps: int = STEPS):
    r = dataclasses.replace(RECIPES[recipe], heal_steps=steps, heal_lr=LR, heal_batch=4)
    return compress(_base(), _calibration(), r, RHO1, parse_bits(bits))


def _factor_targets(gm):
    return {t for s in find_sites(gm) for p in PROJECTIONS for t in (getattr(s, f"{p}_proj").down, getattr(s, f"{p}_proj").up)}


def _kl(gm, windows):
    return evaluate(lambda ids: gm(input_ids=ids), windows, reference=lambda ids: _base().gm(input_ids=ids),
                    progress=False).kl


def test_healing_lowers_the_calibration_kl_and_reports_it_honestly():
    compressed, report = _compressed("wsvd-heal-noq", "w16a16")
    h = report.heal
    assert h["teacher_topk"] == heal.TEACHER_TOPK < _model().model.config.vocab_size  # a top-k teacher, scored exactly
    assert h["steps_taken"] >= h["best_step"] > 0  # a trained state won (else nothing was healed)
    assert h["calib_after"] < 0.9 * h["calib_before"]
    assert h["val_after"] < h["val_before"]
    train, val = _windows()[: h["train_windows"]], _windows()[h["train_windows"]:]
    assert len(val) == h["val_windows"] == 3
    assert _kl(compressed.gm, train[: h["calib_windows"]]) == pytest.approx(h["calib_after"], rel=1e-9)
    assert _kl(compressed.gm, val) == pytest.approx(h["val_after"], rel=1e-9)
    unhealed, _ = _compressed("wsvd-heal-noq", "w16a16", steps=0)
    assert _kl(unhealed.gm, val) == pytest.approx(h["val_before"], rel=1e-9)


@pytest.mark.parametrize("recipe,bits", [("wsvd-heal-noq", "w16a16"), ("wsvd-heal", "w4a4")])
def test_padding_stays_zero_and_only_factors_change(recipe, bits):
    healed, _ = _compressed(recipe, bits)
    unhealed, _ = _compressed(recipe, bits, steps=0)
    factors = _factor_targets(healed.gm)
    before, after = unhealed.gm.state_dict(), healed.gm.state_dict()
    assert set(before) == set(after)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    scales = {scale for t, (_, scale) in quantized_weights(healed.gm).items() if t in factors}
    assert bool(scales) == (bits != "w16a16")  # re-quantised factors get new per-row scales
    assert changed and changed <= factors | scales  # every other weight (biases, norms, o_proj, MLP, head) is frozen
    padded = 0
    for site in find_sites(healed.gm):
        for p in PROJECTIONS:
            proj = getattr(site, f"{p}_proj")
            spec = factor_spec(proj.node)
            U, D = tensor_attr(healed.gm, proj.up), tensor_attr(healed.gm, proj.down)
            d, w = U.shape[0] // spec.blocks, spec.width
            keep_cols = torch.zeros(U.shape, dtype=torch.bool)
            for h, r in enumerate(spec.ranks):
                keep_cols[h * d:(h + 1) * d, h * w:h * w + r] = True
                assert not D[h * w + r:(h + 1) * w].any()  # padded rows of D
                padded += w - r
            assert not U[~keep_cols].any()  # off-diagonal blocks and padded columns of U
    assert padded > 0  # the allocation gave some heads less than the widest rank: padding was tested


def test_evaluation_and_validation_windows_never_train():
    """Every sequence any graph sees during healing is a calibration window; the held-back ones only
    without gradients. Checked by data identity on the graphs' inputs."""
    seen = []

    def spy(module, args, kwargs):
        seen.append((kwargs["input_ids"].clone(), torch.is_grad_enabled()))

    evaluation = token_windows(_model().tokenizer, pydoc_text("evaluation"), 32, 24)
    base = copy.deepcopy(_base())
    calib = _calibration()
    recipe = dataclasses.replace(RECIPES["wsvd-heal-noq"], heal_steps=6, heal_batch=4)
    plan, _ = factor_plan(calib, recipe, RHO1)
    compressed = copy.deepcopy(base)
    Pipeline([FactorizeQKV(plan)])(compressed)
    handles = [g.register_forward_pre_hook(spy, with_kwargs=True) for g in (base.gm, compressed.gm)]
    pass_ = heal.Heal(heal.LogitKL(base), calib.windows, steps=6, lr=1e-5, batch_size=4, eval_every=3)
    Pipeline([pass_])(compressed)
    for h in handles:
        h.remove()
    rows = {tuple(r.tolist()): i for i, r in enumerate(calib.windows)}
    n_train = pass_.report["train_windows"]
    trained = set()
    for ids, grad in seen:
        for row in ids:
            key = tuple(row.tolist())
            assert key in rows, "a sequence that is not a calibration window reached the graph"
            assert not any(torch.equal(row, e) for e in evaluation)
            if grad:
                trained.add(rows[key])
    assert trained and max(trained) < n_train  # validation windows never in a gradient step


def test_quantised_healing_trains_through_the_quantisers():
    healed, report = _compressed("wsvd-heal", "w4a4")
    h = report.heal
    # the KL of the deployed (quantised) graph on the held-out windows goes down; the mean training loss between
    # evaluations is recorded (4-window minibatches of a random tiny model at W4A4: too noisy to be monotone,
    # and it differs across CPUs' float kernels: the held-out gain was 10% on one machine, 3.6% on another)
    assert h["s2"] and h["best_step"] > 0 and h["val_after"] < h["val_before"]
    assert [s for s, _ in h["train_history"]] == [s for s, _ in h["val_history"][1:]]
    assert all(0 < loss < float("inf") for _, loss in h["train_history"])
    assert _kl(healed.gm, _windows()[h["train_windows"]:]) == pytest.approx(h["val_after"], rel=1e-9)
    # the graph holds deployed (4-bit) factors, on the grid of their recorded scales (what the packed artifact
    # stores), and its activation quantisers are the deployed ones again
    recorded = quantized_weights(healed.gm)
    assert _factor_targets(healed.gm) <= set(recorded)
    for t in _factor_targets(healed.gm):
        w = tensor_attr(healed.gm, t).detach()
        assert torch.allclose(fake_quant_weight(w, 4), w, rtol=0, atol=1e-6 * float(w.abs().max()))
        codes = w / tensor_attr(healed.gm, recorded[t][1])[:, None]
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 7.5
    quantisers = [n for n in healed.gm.graph.nodes if n.target is fake_quant_activation]
    assert quantisers and all("ste" not in n.kwargs for n in quantisers)


def test_straight_through_gradient_reaches_down_projections_behind_the_latent_quantiser():
    unhealed, _ = _compressed("wsvd-heal", "w4a4", steps=0)
    gm = copy.deepcopy(unhealed.gm)
    latents = heal._latents(gm, find_sites(gm), s2=False)
    pass_ = heal.Heal(heal.LogitKL(_base()), _windows(), steps=1, lr=1e-5, weight_bits=4)
    ids = _windows()[:2]
    with torch.no_grad():
        ref = _base().gm(input_ids=ids)
    grads = {}
    for on in (False, True):
        heal._StraightThrough(gm).set(on)
        for t in (lat.down_master for lat in latents):
            t.grad = None
        loss = heal.kl_loss(ref, heal._call_with(gm, pass_._quantised(gm, latents, {}), ids), ids)
        loss.backward()
        grads[on] = sum(float(lat.down_master.grad.abs().sum()) for lat in latents)
    heal._StraightThrough(gm).set(False)
    # without the straight-through form only the quantiser scale passes a (tiny) gradient
    assert grads[True] > 5 * grads[False]  # measured: about 18 times


def test_artifact_reload_reproduces_the_healed_logits(tmp_path):
    recipe = dataclasses.replace(RECIPES["wsvd-heal"], heal_steps=STEPS, heal_lr=LR, heal_batch=4)
    compressed, report = _compressed("wsvd-heal", "w8a8")
    manifest = artifact.save(tmp_path / "a", model=MODEL, base=artifact.dense(_base()), compressed=compressed,
                             recipe=recipe, bits=parse_bits("w8a8"), rho1_target=RHO1, report=report, calibration={},
                             environment={})
    assert manifest["heal"]["steps"] == STEPS and manifest["recipe"]["heal_steps"] == STEPS
    loaded = artifact.load(tmp_path / "a", model=_model())
    ids = _windows()[:3]
    with torch.no_grad():
        assert torch.equal(loaded.captured.gm(input_ids=ids), compressed.gm(input_ids=ids))


@pytest.mark.parametrize("argv, message", [
    (["compress", "--model", MODEL, "--recipe", "rtn", "--rho1", "0.5", "--heal-steps", "5", "--out", "x"],
     "--heal-steps: recipe rtn has no low-rank factors to heal"),
    (["table", "--model", MODEL, "--recipes", "wsvd-noq,quarot", "--heal-steps", "5"],
     "--heal-steps: recipe quarot has no low-rank factors to heal"),
    (["compress", "--model", MODEL, "--recipe", "wsvd-noq", "--rho1", "0.5", "--heal-steps", "0", "--out", "x"],
     "--heal-steps 0 must be at least 1"),
    (["compress", "--model", MODEL, "--recipe", "wsvd-heal-noq", "--rho1", "0.5", "--heal-windows", "1", "--out", "x"],
     "--heal-windows 1 must be at least 2"),
    (["compress", "--model", MODEL, "--recipe", "wsvd-heal-noq", "--rho1", "0.5", "--heal-windows", "8", "--stream",
      "--out", "x"], "--heal-windows is for end-to-end healing"),
])
def test_heal_steps_bad_input_gives_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_compress_heals_on_the_heal_windows_not_the_calibration_windows(tmp_path):
    """--heal-windows (the recipe's heal_windows) cuts its own windows from the calibration text: healing trains and
    validates on those (at most 8 held back), the statistics and gradients keep --calib-windows."""
    out = tmp_path / "a"
    assert main(["compress", "--model", MODEL, "--recipe", "wsvd-heal-noq", "--rho1", "0.5", "--heal-steps", "2",
                 "--heal-windows", "11", "--calib-windows", "3", "--seq-len", "32", "--quiet", "--out", str(out)]) == 0
    manifest = artifact.read_manifest(out)
    assert manifest["calibration"]["windows"] == 3 and manifest["calibration"]["heal_windows"] == 11
    assert (manifest["heal"]["train_windows"], manifest["heal"]["val_windows"]) == (10, 1)


def test_teacher_logits_are_computed_once_per_window_across_batches():
    """Training batches draw windows in a new order each epoch: the dense logits are memoised per window, the
    rows not seen yet computed in one call, and what comes back is what the model gives for that batch."""
    calls = []

    def fn(ids):
        calls.append(len(ids))
        return _base().gm(input_ids=ids)

    teacher = MemoLogits(fn)
    w = _windows()[:4]
    first = teacher(w[[0, 1]])
    again = teacher(w[[1, 2, 2, 0]])  # one new window, asked twice
    assert calls == [2, 1]
    with torch.no_grad():
        direct = _base().gm(input_ids=w[[1, 2, 2, 0]])
    assert torch.equal(again[3], first[0]) and torch.equal(again[1], again[2])
    assert torch.allclose(again, direct, rtol=0, atol=1e-5)


def test_learning_rate_warms_up_linearly_then_decays_by_a_cosine():
    f = [heal.lr_factor(i, steps=20, warmup=0.1) for i in range(20)]
    assert f[:2] == [0.5, 1.0]  # w = 2 warmup steps
    assert all(a > b for a, b in itertools.pairwise(f[1:])) and 0 < f[-1] < 0.01  # strictly down, the last step still moves
    assert f[2 + 18 // 2] == pytest.approx(0.5, abs=0.1)  # half-way down the cosine


def test_training_kl_is_the_evaluated_kl_over_the_scored_positions():
    """The training loss (float32, masked) is the mean KL over the positions evaluation scores (float64), with the
    unscored (-100) labels left out, not averaged in."""
    g = torch.Generator().manual_seed(0)
    ref, logits = torch.randn(2, 6, 11, generator=g) * 3, torch.randn(2, 6, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, 2:4] = labels[1, 5] = -100
    keep = labels[:, 1:] != -100
    p, q = (torch.log_softmax(x[:, :-1].double(), -1)[keep] for x in (ref, logits))
    exact = float((p.exp() * (p - q)).sum(-1).mean())
    assert float(heal.kl_loss(ref, logits, labels)) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("k", [0, 3])
def test_teacher_keeps_top_k_for_training_and_scores_stay_exact(k):
    """teacher_topk k: per window the memo holds the top k (uint16 ids) and the tail, not [S, V] logits (k = 0: the
    logits); the training loss is the (top-k) KL to the dense logits, below the exact KL at k = 3; scores are exact."""
    objective = heal.LogitKL(_base(), teacher_topk=k)
    gm, w, cpu = _compressed("wsvd-heal-noq", "w16a16", steps=0)[0].gm, _windows()[:3], torch.device("cpu")
    with torch.no_grad():
        loss = float(objective.loss(gm, {}, w[[0, 1]], cpu))
        again = objective.teacher(w[[2, 0]])  # rows memoised across batches, fields stacked back
        dense, logits = _base().gm(input_ids=w), gm(input_ids=w)
    exact, v = _kl(gm, w[:2]), dense.shape[-1]
    rows = list(objective.teacher.memo.values())
    assert len(rows) == 3
    if k:
        assert all(isinstance(r, TopK) and r.logp.shape == r.ids.shape == (32, k) and r.ids.dtype == torch.uint16
                   for r in rows)
        expected = top_k(dense[[2, 0]], k)
        assert torch.equal(again.ids, expected.ids)
        assert torch.allclose(again.logp, expected.logp, rtol=0, atol=1e-5)
        assert torch.allclose(again.tail, expected.tail, rtol=0, atol=1e-5)
        assert loss == pytest.approx(float(heal.kl_loss(top_k(dense[:2], k), logits[:2], w[:2])), rel=1e-5)
        assert 0 < loss < exact
    else:
        assert all(r.shape == (32, v) for r in rows) and torch.allclose(again, dense[[2, 0]], rtol=0, atol=1e-5)
        assert loss == pytest.approx(exact, rel=1e-4)  # float32 loss, float64 score
    assert objective.scorer(cpu, 4)(gm, w[:2]) == pytest.approx(exact, rel=1e-9)


def test_negative_teacher_topk_is_refused():
    with pytest.raises(WsvdError, match="teacher_topk -1 must be at least 0"):
        heal.LogitKL(_base(), teacher_topk=-1)


def test_rotating_recipes_heal_at_the_rate_for_factors_with_the_fused_norm_gain():
    """The down-projections of a rotating recipe carry the RMSNorm gain (D diag(gamma) S1), so the same Adam step is
    larger relative to them: their default peak rate is HEAL_LR_ROTATED, also when --heal-steps turns healing on for
    another rotating recipe; an explicit rate is kept."""
    from wsvd_passes.compression.recipes import HEAL_LR, HEAL_LR_ROTATED

    assert HEAL_LR_ROTATED < HEAL_LR
    assert RECIPES["wsvd-heal"].heal_lr == HEAL_LR_ROTATED and RECIPES["wsvd-heal-noq"].heal_lr == HEAL_LR
    assert dataclasses.replace(RECIPES["qsvd"], heal_steps=5).heal_lr == HEAL_LR_ROTATED
    assert dataclasses.replace(RECIPES["svd-llm"], heal_steps=5).heal_lr == HEAL_LR
    assert dataclasses.replace(RECIPES["wsvd-heal"], heal_lr=3e-5).heal_lr == 3e-5

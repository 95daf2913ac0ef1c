"""Lowering: latent-cache attention -> wsvd::latent_attention; same tokens, one op node, compile, export."""

import copy

import pytest
import torch
from test_latent_kv import factored_decoder, steps

import lowering
from lowering.ops import latent_attention
from wsvd_passes.algorithms.rope import rope_half_tables
from wsvd_passes.errors import WsvdError
from wsvd_passes.eval.generation import generate, greedy_generate
from wsvd_passes.graph.pipeline import Pipeline
from wsvd_passes.passes.latent_kv import LatentKVCache

aten = torch.ops.aten


def latent_decoder(name="tiny-llama-gqa", **kw):
    decoder, report = factored_decoder(name, **kw)
    Pipeline([LatentKVCache(decoder.config)])(decoder)
    return decoder


def _op_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.wsvd.latent_attention.default]


@pytest.mark.parametrize("name, recipe", [("tiny-llama", "wsvd-noft"), ("tiny-llama-gqa", "wsvd-noft"),
                                          ("tiny-llama-gqa", "qsvd-noq"), ("tiny-llama-gqa", "svd-llm")])
def test_lowered_graph_decodes_like_the_latent_graph(name, recipe):
    unlowered = latent_decoder(name, recipe=recipe)
    lowered = lowering.lower(copy.deepcopy(unlowered))
    assert len(_op_nodes(lowered.gm)) == 2
    assert not lowered.gm.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default)
    ids = torch.randint(3, 300, (1, 17))
    torch.testing.assert_close(steps(lowered, ids), steps(unlowered, ids), atol=5e-5, rtol=1e-5)
    assert torch.equal(greedy_generate(lowered, ids[:, :4], 30), greedy_generate(unlowered, ids[:, :4], 30))


def test_compiled_lowered_step_and_sampling():
    lowered = lowering.lower(latent_decoder())
    step = lowering.compile_step(lowered)
    assert len(_op_nodes(lowered.gm)) == 2  # the CPU compiles a traceable copy; the decoder keeps the op
    assert not _op_nodes(step._orig_mod)  # what inductor compiles calls the op's math instead
    assert len(step._orig_mod.graph.find_nodes(op="call_function", target=lowering.ops.latent_attention_traceable)) == 2
    prompt = torch.randint(3, 300, (1, 6))
    assert torch.equal(generate(lowered, prompt, 12, step=step), greedy_generate(lowered, prompt, 12))
    a = generate(lowered, prompt, 12, step=step, temperature=0.8, top_k=20, seed=7)
    b = generate(lowered, prompt, 12, temperature=0.8, top_k=20, seed=7)
    assert torch.equal(a, b)


def test_lowered_program_exports_with_one_op_node_per_layer(tmp_path):
    lowered = lowering.lower(latent_decoder())
    ep = lowered.reexport()
    assert len([n for n in ep.graph.nodes if n.target is torch.ops.wsvd.latent_attention.default]) == 2
    torch.export.save(ep, tmp_path / "lowered.pt2")
    loaded = torch.export.load(tmp_path / "lowered.pt2").module()
    kwargs = {"input_ids": torch.tensor([[5]]), "cache_position": torch.tensor([0])}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**kwargs), ep.module()(**kwargs))


def test_op_passes_opcheck():
    torch.manual_seed(0)
    B, n_kv, rep, L, D, r_k, r_v = 2, 2, 3, 11, 16, 5, 7
    tables = rope_half_tables(1.0 / 10000 ** (torch.arange(0, D, 2) / D), L)
    args = (torch.randn(B, n_kv * rep, D), torch.randn(B, n_kv, L, r_k), torch.randn(n_kv, r_k, D),
            torch.randn(B, n_kv, L, r_v), torch.tensor([4, 11]), *tables, D ** -0.5, 1.0)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(latent_attention, args, test_utils=utils)
    int8 = [torch.randint(-127, 128, (B, n_kv, L, r), dtype=torch.int8) for r in (r_k, r_v)]
    scales = [torch.rand(B, n_kv, L) / 100 for _ in range(2)]
    torch.library.opcheck(latent_attention, (*args[:1], int8[0], args[2], int8[1], *args[4:]),
                          {"ck_scale": scales[0], "cv_scale": scales[1]}, test_utils=utils)


def test_lowering_needs_the_latent_rewrite():
    decoder, _ = factored_decoder("tiny-llama")
    with pytest.raises(WsvdError, match="run LatentKVCache before lowering"):
        lowering.lower(decoder)


@pytest.mark.slow  # 38 s: SmolLM2 compiled
def test_smollm2_generates_the_same_tokens_through_the_lowered_op(smollm2, smollm2_forward):
    from wsvd_passes.compression.compress import calibrate, factor_plan
    from wsvd_passes.compression.recipes import RECIPES
    from wsvd_passes.eval.data import pydoc_text, token_windows
    from wsvd_passes.graph.capture import capture_decode
    from wsvd_passes.passes.factorize import FactorizeQKV

    recipe = RECIPES["wsvd-noft"]
    windows = token_windows(smollm2.tokenizer, pydoc_text("calibration"), 128, max_windows=4)
    calib = calibrate(copy.deepcopy(smollm2_forward), windows, [recipe], progress=False)
    plan, _ = factor_plan(calib, recipe, 0.6)
    decoder = capture_decode(smollm2.model, max_cache_len=48)
    Pipeline([FactorizeQKV(plan), LatentKVCache(decoder.config)])(decoder)
    prompt = smollm2.tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    unlowered = greedy_generate(decoder, prompt, 16)
    lowered = lowering.lower(decoder)
    assert torch.equal(greedy_generate(lowered, prompt, 16), unlowered)


def test_generate_and_decode_bench_commands(tmp_path, capsys):
    import json

    from wsvd_passes.cli import main

    out = tmp_path / "g.json"
    assert main(["generate", "--model", "tiny-llama-gqa", "--prompt", "def f(x):", "--max-new-tokens", "6",
                 "--recipe", "wsvd", "--bits", "w8a8", "--rho1", "0.6", "--calib-windows", "4", "--seq-len", "32",
                 "--no-compile", "--quiet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    # the whole recipe (rotations, QAT, W8A8), its 8-bit latents cached as int8 codes, lowered
    assert result["path"].startswith("wsvd w8a8 rho1") and "(int8 latents)" in result["path"]
    assert "lowered to wsvd::latent_attention" in result["path"] and len(result["tokens"]) > 6
    assert "lowered to wsvd::latent_attention" in capsys.readouterr().out

    out = tmp_path / "b.json"
    assert main(["bench", "decode", "--device", "cpu", "--quick", "--layers", "3", "--cache-len", "40", "--steps", "4",
                 "--no-compile", "--json", str(out)]) == 0
    bench = json.loads(out.read_text())
    assert bench["correct"] and bench["shape"]["layers"] == 3
    assert all(c["passed"] for c in bench["check"]["variants"].values())
    assert bench["check"]["variants"]["latent"]["rel_err"] < 1e-5  # float32: rounding only
    assert bench["baseline"] in ("hf-static-cache", "sdpa-prefix") and bench["dense"] == bench["dense_variants"][bench["baseline"]]
    assert bench["latent"]["tokens_per_s"] > 0 and all(v["tokens_per_s"] > 0 for v in bench["dense_variants"].values())
    assert bench["speedup"] == pytest.approx(bench["latent"]["tokens_per_s"] / bench["dense"]["tokens_per_s"])
    assert set(bench["versions"]) >= {"torch", "triton", "transformers"} and bench["device"].startswith("cpu")
    assert bench["cache_bytes_latent"] < bench["cache_bytes_dense"] and bench["rho2"] == 0.5
    assert "latent speedup" in capsys.readouterr().out
    assert main(["bench", "decode", "--device", "cpu", "--cache-len", "4", "--steps", "8"]) == 2
    assert main(["bench", "decode", "--device", "cpu", "--quick", "--layers", "0"]) == 2
    assert main(["generate", "--model", "tiny-llama", "--prompt", "x", "--recipe", "rtn", "--bits", "w9a9"]) == 2
    assert "unknown bit setting 'w9a9'" in capsys.readouterr().err


def test_cuda_kernel_falls_back_to_pytorch_with_one_warning(monkeypatch):
    """A Triton kernel that cannot compile, or ranks above MAX_RANK, run the PyTorch path (never a wrong
    answer), with one warning each; bad arguments still raise their one-line error."""
    import lowering.ops as ops
    from wsvd_kernels.latent_attention import MAX_RANK
    from wsvd_kernels.reference import latent_decode_attention_torch

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed\ndeep compiler trace")

    monkeypatch.setattr(ops, "latent_decode_attention_triton", broken)
    monkeypatch.setattr(ops, "_warned", set())
    L, D = 9, 16
    args = (torch.randn(1, 2, D), torch.randn(1, 1, L, 5), torch.randn(1, 5, D), torch.randn(1, 1, L, 7),
            torch.tensor([6]), *rope_half_tables(1.0 / 10000 ** (torch.arange(0, D, 2) / D), L), D ** -0.5, 1.0)
    expected = latent_decode_attention_torch(*args[:7], scale=args[7], attention_scaling=args[8])
    with pytest.warns(RuntimeWarning, match="Triton kernel failed .RuntimeError: PassManager::run failed.; running"):
        torch.testing.assert_close(ops._latent_attention_cuda(*args), expected)
    big = (args[0], torch.randn(1, 1, L, MAX_RANK + 1), torch.randn(1, MAX_RANK + 1, D), *args[3:])
    with pytest.warns(RuntimeWarning, match=f"latent rank {MAX_RANK + 1} > {MAX_RANK}"):
        ops._latent_attention_cuda(*big)
    with pytest.raises(ValueError, match="lengths must be"):
        ops._latent_attention_cuda(*args[:4], torch.tensor([6.0]), *args[5:])


def test_decode_bench_reports_a_mismatch_and_does_not_time_it(monkeypatch, tmp_path, capsys):
    """Dense caches prefilled from the wrong kv head's up-projection (a head-mapping bug): the check catches
    the latent variant (both dense variants read the same caches and still agree)."""
    import json

    import lowering.bench
    from wsvd_passes.cli import main

    rebuild = lowering.bench.latent_to_dense
    monkeypatch.setattr(lowering.bench, "latent_to_dense", lambda c, up: rebuild(c, up.roll(1, dims=0)))
    out = tmp_path / "b.json"
    assert main(["bench", "decode", "--device", "cpu", "--quick", "--cache-len", "24", "--steps", "3", "--no-compile",
                 "--json", str(out)]) == 1
    bench = json.loads(out.read_text())
    check = bench["check"]["variants"]
    assert not bench["correct"] and not check["latent"]["passed"] and check["sdpa-prefix"]["passed"]
    assert bench["latent"] is None and bench["speedup"] is None and bench["dense"]["tokens_per_s"] > 0
    printed = capsys.readouterr()
    assert "MISMATCH: not timed" in printed.out and printed.err.startswith("error: the variants' outputs disagree")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_bench_checks_and_times_on_cuda():
    """On a GPU, compiled, bf16: every variant passes the check before it is timed."""
    from lowering.bench import bench_decode

    result = bench_decode(device="cuda", quick=True, batch=4, cache_len=512, steps=8)
    assert result["correct"], result["check"]
    assert result["speedup"] is not None and result["dtype"] == "torch.bfloat16"

"""Rotation passes compute the same function (float64) and keep the graph usable."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wsvd_passes.algorithms.hadamard import hadamard_factors, hadamard_macs, hadamard_rotate, random_hadamard
from wsvd_passes.errors import WsvdError
from wsvd_passes.eval.generation import greedy_generate
from wsvd_passes.graph.capture import capture_decode, capture_forward
from wsvd_passes.graph.pipeline import Pipeline, same_function
from wsvd_passes.graph.residual import find_residual_stream
from wsvd_passes.passes.rotate import OnlineHadamard, RotateResidual, RotateValueHeads, rotated_rows


def _double_llama(heads, kv_heads, head_dim, bias, seed, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = heads * head_dim
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, attention_bias=bias,
                         mlp_bias=bias, tie_word_embeddings=seed % 2 == 0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():  # non-trivial norm gammas, so that their fusion is tested
        for module in model.modules():
            if hasattr(module, "variance_epsilon"):
                module.weight.uniform_(0.5, 1.5)
    return model


ALL = [RotateResidual, RotateValueHeads, OnlineHadamard]


@settings(max_examples=6)
@given(kv_heads=st.sampled_from([1, 2, 3]), gqa=st.sampled_from([1, 2]), head_dim=st.sampled_from([8, 16]),
       bias=st.booleans(), seed=st.integers(0, 100))
def test_rotations_compute_the_same_function(kv_heads, gqa, head_dim, bias, seed):
    model = _double_llama(kv_heads * gqa, kv_heads, head_dim, bias, seed)
    rotated = capture_forward(model)
    Pipeline([p(seed=seed) for p in ALL])(rotated)
    inputs = [{"input_ids": torch.randint(0, 64, (2, 17))}, {"input_ids": torch.randint(0, 64, (1, 5))}]

    def reference(**kwargs):  # the eager model itself
        return model(**kwargs).logits

    # HF's RMSNorm computes in float32 even for float64 models: that rounding is the tolerance
    same_function(rotated.gm, reference, inputs, atol=1e-6)
    same_function(rotated.reexport().module(), reference, inputs, atol=1e-6)
    assert not any(g for g in (n.gamma for n in find_residual_stream(rotated.gm).norms))  # gammas fused away


def test_rotation_in_row_blocks_is_the_whole_product():
    weight, gamma, S1 = torch.randn(37, 12), torch.rand(12, dtype=torch.float64) + 0.5, random_hadamard(12, seed=1)
    for g in (None, gamma):
        whole = ((weight.double() if g is None else weight.double() * g[None, :]) @ S1).float()
        blocked = rotated_rows(weight, S1, g, rows=5)  # 8 blocks, the last of 2 rows
        assert blocked.dtype == torch.float32 and torch.equal(blocked, whole)


def test_hadamard_is_exactly_orthogonal_for_awkward_orders():
    for n in (12, 24, 96, 160, 576):
        H = random_hadamard(n, seed=3)
        torch.testing.assert_close(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-13, rtol=0)
        assert torch.allclose(H.abs(), torch.full_like(H, n**-0.5))
    assert not torch.equal(random_hadamard(96, 0), random_hadamard(96, 1))
    with pytest.raises(WsvdError, match="no Hadamard matrix of order 50"):
        random_hadamard(50, 0)


def test_structured_hadamard_is_torchaos_matrix_and_applies_it_without_forming_it():
    from torchao.prototype.spinquant.hadamard_utils import random_hadamard_matrix

    for n in (1, 12, 40, 96, 128, 688, 1536):  # K in {1, 12, 20, 12, 1, 172, 12}, M from 1 to 128
        dense = torch.round(random_hadamard_matrix(n, "cpu", seed=5).double() * n**0.5) / n**0.5
        assert torch.equal(random_hadamard(n, 5), dense)  # torchao's seeded matrix, bit for bit
        factors = hadamard_factors(n, 5).tensors()
        signs, k, m1, m2 = factors  # the layout the vLLM export documents: H = diag(signs) (k^T kron m1 kron m2)
        assert torch.equal(torch.diag(signs) @ torch.kron(k.T.contiguous(), torch.kron(m1, m2)), dense)
        x = torch.randn(3, 7, n, dtype=torch.float64, requires_grad=True)
        y = hadamard_rotate(x, *factors)
        torch.testing.assert_close(y, x @ dense, atol=1e-12, rtol=0)
        y.square().sum().backward()  # |x H|^2 = |x|^2: the gradient flows through the factors
        torch.testing.assert_close(x.grad, 2 * x.detach(), atol=1e-11, rtol=0)
        low = hadamard_rotate(x.detach().float(), *(f.float() for f in factors))
        torch.testing.assert_close(low, (x.detach() @ dense).float(), atol=1e-5, rtol=1e-5)
    structured, full = hadamard_macs(11008)  # Llama-2-7B's MLP: K 172, M1 = M2 = 8
    assert (structured, full) == (11008 * 188, 11008**2)


def test_rotated_factored_decode_graph_generates_the_same_tokens():
    from wsvd_passes.compression.compress import calibrate, factor_plan
    from wsvd_passes.compression.recipes import RECIPES
    from wsvd_passes.passes.factorize import FactorizeQKV

    model = _double_llama(6, 2, 16, False, 1).float()
    recipe = RECIPES["wsvd-noft"]
    calib = calibrate(capture_forward(model), torch.randint(0, 64, (4, 30)), [recipe], progress=False)
    plan, _ = factor_plan(calib, recipe, 0.7)
    decoder = capture_decode(model, max_cache_len=32)
    Pipeline([FactorizeQKV(plan)])(decoder)
    prompt = torch.randint(0, 64, (1, 5))
    before = greedy_generate(decoder, prompt, 20)
    Pipeline([p() for p in ALL])(decoder)
    assert torch.equal(greedy_generate(decoder, prompt, 20), before)


def test_rotation_refuses_models_without_rmsnorm_and_odd_sizes():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    config._attn_implementation = "sdpa"
    gpt2 = capture_forward(GPT2LMHeadModel(config).eval())
    with pytest.raises(WsvdError, match="token embeddings|RMSNorm|linear"):
        find_residual_stream(gpt2.gm)
    odd = capture_forward(_double_llama(5, 5, 10, False, 0))  # hidden 50: no Hadamard of that order
    with pytest.raises(WsvdError, match="RotateResidual: no Hadamard matrix of order 50"):
        Pipeline([RotateResidual()])(odd)


def test_smollm2_rotated_logits_match(smollm2, smollm2_forward):
    rotated = copy.deepcopy(smollm2_forward)
    Pipeline([p() for p in ALL])(rotated)
    ids = smollm2.tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = rotated.gm(input_ids=ids), smollm2_forward.gm(input_ids=ids)
    assert (a - b).abs().max() < 1e-3 * b.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_lm_head_stays_tied_to_the_rotated_embedding(tied):
    from wsvd_passes.graph.graph_utils import tensor_attr
    from wsvd_passes.passes.rotate import TIED_GAMMA

    model = _double_llama(4, 2, 8, False, seed=0 if tied else 1)
    reference, rotated = capture_forward(model), capture_forward(model)
    Pipeline([RotateResidual(seed=5)])(rotated)
    gm = rotated.gm
    embedding = find_residual_stream(gm).embedding
    head = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    head = head[0] if isinstance(head, (tuple, list)) else head
    table, head_weight = tensor_attr(gm, embedding.args[0].target), tensor_attr(gm, head.args[1].target)
    gammas = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith(TIED_GAMMA)]
    assert torch.equal(table, head_weight) == tied  # equal tensors: the packed artifact stores them once
    assert len(gammas) == int(tied)
    inputs = [{"input_ids": torch.randint(0, 64, (2, 9))}]
    same_function(gm, reference.gm, inputs, atol=1e-6)

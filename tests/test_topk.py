"""Top-k + tail distributions: the kept fields and KL_k against float64 references on awkward sizes, KL_k a lower
bound of the exact KL and equal to it at k = V, and its gradient (numerical and closed form)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wsvd_passes.eval.topk import kl_topk, top_k


def _logits(seed: int, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _merged_kl(p: torch.Tensor, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float64 reference: KL of p and q (log-probabilities [..., V]) merged onto the tokens ``ids`` and one tail."""
    on = torch.zeros_like(p, dtype=torch.bool).scatter(-1, ids, True)
    tail = lambda x: torch.where(on, 0.0, x.exp()).sum(-1)  # noqa: E731  (summed, not 1 - the top k's mass)
    p_t, q_t = tail(p), tail(q)
    top = torch.where(on, p.exp() * (p - q), 0.0).sum(-1)
    return top + torch.where(p_t > 0, p_t * (p_t.log() - q_t.log()), 0.0)


@settings(max_examples=25)
@given(seed=st.integers(0, 2**16), s=st.sampled_from([1, 3, 7]), v=st.sampled_from([2, 5, 37, 101]),
       which=st.sampled_from(["1", "V/3", "V"]), scale=st.sampled_from([0.5, 3.0, 12.0]))
def test_topk_kl_is_the_merged_kl_a_lower_bound_and_exact_at_k_equal_v(seed, s, v, which, scale):
    k = {"1": 1, "V/3": max(1, v // 3), "V": v}[which]
    z, w = _logits(seed, (2, s, v), scale), _logits(seed + 1, (2, s, v), scale)
    p64, q64 = torch.log_softmax(z, -1), torch.log_softmax(w, -1)
    kept = top_k(z.float(), k)
    # the kept fields: the k largest float64 log-probabilities, their ids, log(1 - their mass)
    assert kept.logp.dtype == torch.float32 and kept.ids.dtype == torch.uint16 and kept.logp.shape == (2, s, k)
    ids = kept.ids.long()
    assert torch.allclose(kept.logp.double(), p64.gather(-1, ids), rtol=0, atol=1e-5)
    assert torch.allclose(p64.gather(-1, ids).amin(-1), p64.topk(k, -1).values.amin(-1), rtol=0, atol=1e-5)
    on = torch.zeros_like(p64, dtype=torch.bool).scatter(-1, ids, True)
    tail64 = torch.where(on, 0.0, p64.exp()).sum(-1).log()  # log of the mass off the top k: -inf at k = V
    assert torch.equal(kept.tail.isinf(), tail64.isinf()) and bool(tail64.isinf().all()) == (k == v)
    finite = tail64.isfinite()
    assert torch.allclose(kept.tail.double()[finite], tail64[finite], rtol=1e-5, atol=1e-5)
    # KL_k = the merged KL (float64); <= the exact KL; = it at k = V
    kl_k = kl_topk(kept, torch.log_softmax(w.float(), -1)).double()
    exact = (p64.exp() * (p64 - q64)).sum(-1)
    tol = 1e-5 * (1 + exact.abs())
    assert torch.allclose(kl_k, _merged_kl(p64, q64, ids), rtol=0, atol=float(tol.max()))
    assert bool((kl_k <= exact + tol).all())
    if k == v:
        assert torch.allclose(kl_k, exact, rtol=0, atol=float(tol.max()))


@pytest.mark.parametrize("k", [1, 4, 13])
def test_topk_kl_gradient_numerical_and_closed_form(k):
    """d KL_k / dz_j = q_j - p_j on the kept tokens, q_j (1 - p_tail / q_tail) off them (float64, V = 13, S = 3)."""
    z, w = _logits(0, (3, 13), 2.0), _logits(1, (3, 13), 2.0).requires_grad_(True)
    kept = top_k(z, k)
    f = lambda x: kl_topk(kept, torch.log_softmax(x, -1)).sum()  # noqa: E731
    assert torch.autograd.gradcheck(f, (w,))
    f(w).backward()
    p, q = torch.softmax(z, -1), torch.softmax(w.detach(), -1)
    on = torch.zeros_like(p, dtype=torch.bool).scatter(-1, kept.ids.long(), True)
    p_t, q_t = torch.where(on, 0.0, p).sum(-1, keepdim=True), torch.where(on, 0.0, q).sum(-1, keepdim=True)
    closed = torch.where(on, q - p, q * (1 - p_t / q_t.clamp_min(1e-300)))
    assert torch.allclose(w.grad, closed, rtol=0, atol=1e-6)

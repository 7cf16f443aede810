"""Property tests: random shapes, ignore patterns and logit transforms against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_hybrid
from tests.reference import assert_close_scaled, grads, leaf64, logits64, logprobs_entropy64


@pytest.mark.parametrize("backend", ["torch", "triton"])
@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(1, 40),
    dim=st.integers(1, 40),
    vocab=st.integers(2, 150),
    temperature=st.sampled_from([1.0, 0.5, 2.0]),
    softcap=st.sampled_from([None, 1.5, 20.0]),
    ignore_fraction=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_problems_match_reference(backend, num_tokens, dim, vocab, temperature, softcap, ignore_fraction, seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, dim, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=generator) * 2).requires_grad_()
    bias = torch.randn(vocab, generator=generator).requires_grad_()
    targets = torch.randint(0, vocab, (num_tokens,), generator=generator)
    targets[torch.rand(num_tokens, generator=generator) < ignore_fraction] = -100
    g_logp, g_entropy = torch.randn(2, num_tokens, generator=generator)
    options = dict(temperature=temperature, softcap=softcap)

    logp, entropy = fused_hybrid.linear_logprobs(
        hidden, weight, targets, bias, return_entropy=True, backend=backend, **options
    )
    actual = grads((logp * g_logp + entropy * g_entropy).sum(), [hidden, weight, bias])
    leaves = [leaf64(t) for t in (hidden, weight, bias)]
    logp64, entropy64 = logprobs_entropy64(leaves[0], leaves[1], targets, leaves[2], **options)
    expected = grads((logp64 * g_logp.double() + entropy64 * g_entropy.double()).sum(), leaves)

    # fp32 logits carry an absolute error ~ eps * sum_d |h_d w_d| / temperature (the dot product's own rounding),
    # which lse, logp and entropy inherit.
    magnitudes = logits64(leaves[0].abs(), leaves[1].abs(), leaves[2].abs(), temperature=temperature)
    logit_scale = max(1.0, magnitudes.max().item())
    assert (logp.double() - logp64).abs().max() <= 2e-6 * logit_scale
    assert (entropy.double() - entropy64).abs().max() <= 2e-6 * logit_scale
    # That logit error also bounds how well fp32 resolves 1 - p for a confident token; the gradients carry it
    # times the upstream gradient and the other operand of the matmul.
    operand_scale = max(1.0, hidden.abs().max().item(), weight.abs().max().item())
    upstream_scale = max(g_logp.abs().max().item(), g_entropy.abs().max().item())
    atol = 1e-6 * logit_scale * upstream_scale * operand_scale
    for name, got, want in zip(("d_hidden", "d_weight", "d_bias"), actual, expected):
        assert_close_scaled(got, want, 5e-5, name, atol=atol)

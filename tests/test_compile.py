"""The losses are torch.library custom ops: torch.compile traces them with fullgraph=True (no graph break)."""

from __future__ import annotations

import pytest
import torch

import fused_hybrid
from tests.reference import assert_close_scaled, grads


def all_losses(hidden, weight, targets, backend):
    batch = targets.shape[0]
    total = fused_hybrid.linear_cross_entropy(
        hidden, weight, targets, label_smoothing=0.1, z_loss=1e-3, backend=backend
    )
    logp, entropy = fused_hybrid.linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    total = total + logp.sum() * 1e-2 + entropy.mean()
    advantages = torch.linspace(-1, 1, batch)
    total = (
        total
        + fused_hybrid.grpo_loss(
            hidden,
            weight,
            targets,
            advantages=advantages,
            backend=backend,
            aggregation="seq-mean-token-mean",
            entropy_coef=0.01,
        ).loss
    )
    total = (
        total
        + fused_hybrid.chord_loss(
            hidden,
            weight,
            targets,
            is_expert=torch.arange(batch) % 2 == 0,
            mu=0.3,
            advantages=advantages,
            use_phi=True,
            backend=backend,
        ).loss
    )
    total = total + fused_hybrid.dpo_loss(hidden, weight, targets, loss_type="simpo", backend=backend).loss
    total = total + fused_hybrid.ift_loss(hidden, weight, targets, backend=backend).loss
    old_logp = torch.full(targets.shape, -3.0)
    total = (
        total
        + fused_hybrid.cispo_loss(
            hidden, weight, targets, advantages=advantages, old_logp=old_logp, backend=backend
        ).loss
    )
    total = (
        total
        + fused_hybrid.gmpo_loss(
            hidden, weight, targets, advantages=advantages, old_logp=old_logp, backend=backend
        ).loss
    )
    return total + fused_hybrid.dft_loss(hidden, weight, targets, backend=backend).loss


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fullgraph_compile_matches_eager(backend):
    torch._dynamo.reset()
    hidden = torch.randn(4, 9, 16, requires_grad=True)
    weight = (torch.randn(37, 16) / 4).requires_grad_()
    targets = torch.randint(0, 37, (4, 9))
    targets[:, :2] = -100
    compiled = torch.compile(all_losses, fullgraph=True, backend="aot_eager")
    got = compiled(hidden, weight, targets, backend)
    got_grads = grads(got, [hidden, weight])
    expected = all_losses(hidden, weight, targets, backend)
    assert_close_scaled(got, expected, 1e-6)
    for g, e in zip(got_grads, grads(expected, [hidden, weight])):
        assert_close_scaled(g, e, 1e-5)


def test_inductor_fullgraph_with_a_transposed_hidden():
    """The fake implementation reports the strides the kernels return (contiguous gradients), so inductor's code
    agrees with the real op for a non-contiguous hidden (a transposed view) and a transposed head."""
    torch._dynamo.reset()
    hidden_t = torch.randn(16, 2 * 9, requires_grad=True)  # stored [D, N]: the hidden states are its transpose
    weight_t = (torch.randn(16, 37) / 4).requires_grad_()  # stored [D, V]
    targets = torch.randint(0, 37, (2 * 9,))
    targets[:3] = -100

    def loss_fn(hidden_t, weight_t, targets):
        logp, entropy = fused_hybrid.linear_logprobs(
            hidden_t.T, weight_t.T, targets, return_entropy=True, backend="torch"
        )
        return (
            fused_hybrid.linear_cross_entropy(hidden_t.T * 2, weight_t.T, targets, backend="torch")
            + (logp * torch.linspace(-1, 1, logp.shape[0]) + entropy).sum()
        )

    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    got = compiled(hidden_t, weight_t, targets)
    got_grads = grads(got, [hidden_t, weight_t])
    expected = loss_fn(hidden_t, weight_t, targets)
    assert_close_scaled(got, expected, 1e-5)
    for g, e in zip(got_grads, grads(expected, [hidden_t, weight_t])):
        assert_close_scaled(g, e, 1e-5)

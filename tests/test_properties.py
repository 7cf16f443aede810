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


@settings(max_examples=12, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 9)),
    vocab=st.integers(2, 60),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.2]),
    z_loss=st.sampled_from([0.0, 1e-2]),
    backend=st.sampled_from(["torch", "triton"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cross_entropy_random_problems(shape, vocab, dtype, reduction, label_smoothing, z_loss, backend, seed):
    from tests.test_cross_entropy import reference_ce64

    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, 12, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(vocab, 12, generator=generator).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, shape, generator=generator)
    targets[torch.rand(shape, generator=generator) < 0.3] = -100
    options = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)
    loss = fused_hybrid.linear_cross_entropy(hidden, weight, targets, backend=backend, **options)
    upstream = torch.randn(loss.shape, generator=generator)
    actual = grads((loss * upstream).sum(), [hidden, weight])
    leaves = [leaf64(hidden), leaf64(weight)]
    expected_loss = reference_ce64(leaves[0], leaves[1], targets, **options)
    expected = grads((expected_loss * upstream.double()).sum(), leaves)
    rel = 2e-5 if dtype == torch.float32 else 3e-2
    assert_close_scaled(loss, expected_loss, rel, "loss", atol=1e-5)
    for name, got, want in zip(("d_hidden", "d_weight"), actual, expected):
        assert_close_scaled(got, want, rel, name, atol=1e-5)


OBJECTIVE_OPTIONS = {
    "dft": st.just({}),
    "grpo": st.fixed_dictionaries(
        {
            "aggregation": st.sampled_from(
                ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
            ),
            "importance_sampling": st.sampled_from(["token", "sequence"]),
            "beta": st.sampled_from([0.0, 0.05]),
            "entropy_coef": st.sampled_from([0.0, 0.01]),
            "dual_clip": st.sampled_from([None, 3.0]),
        }
    ),
    "chord": st.fixed_dictionaries(
        {"mu": st.sampled_from([0.0, 0.4, 1.0]), "use_phi": st.booleans(), "cutoff_prob": st.sampled_from([1.0, 0.5])}
    ),
    "dpo": st.fixed_dictionaries(
        {"loss_type": st.sampled_from(["sigmoid", "ipo", "simpo"]), "nll_weight": st.sampled_from([0.0, 0.3])}
    ),
    "minor_sft": st.fixed_dictionaries({"length_normalized": st.booleans(), "beta": st.sampled_from([0.1, 1.0])}),
    "ift": st.fixed_dictionaries({"gamma": st.sampled_from([0.0, 0.5, 0.95])}),
}


@pytest.mark.parametrize("name", list(OBJECTIVE_OPTIONS))
@settings(max_examples=8, deadline=None)
@given(
    data=st.data(),
    pairs=st.integers(1, 3),
    length=st.integers(1, 8),
    vocab=st.integers(2, 40),
    backend=st.sampled_from(["torch", "triton"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_objectives_random_problems(name, data, pairs, length, vocab, backend, seed):
    from tests import naive_objectives as naive

    options = data.draw(OBJECTIVE_OPTIONS[name])
    generator = torch.Generator().manual_seed(seed)
    batch = 2 * pairs
    hidden = torch.randn(batch, length, 10, generator=generator).requires_grad_()
    weight = torch.randn(vocab, 10, generator=generator).requires_grad_()
    targets = torch.randint(0, vocab, (batch, length), generator=generator)
    loss_mask = (torch.rand(batch, length, generator=generator) > 0.3).long()
    extra = {}
    if name in ("grpo", "chord"):
        # rollout log-probs within +-1 nat of the policy's own, as in RL (ratios on both sides of every clip bound);
        # independent draws put ratios up to e^5 on a token, which the fixed tolerances below do not scale with
        with torch.no_grad():
            policy_logp, _ = logprobs_entropy64(leaf64(hidden), leaf64(weight), targets)
        spread = torch.rand(batch, length, generator=generator, dtype=torch.float64) * 2 - 1
        extra = dict(advantages=torch.randn(batch, generator=generator), old_logp=(policy_logp + spread).float())
    if name == "chord":
        extra["is_expert"] = torch.rand(batch, generator=generator) < 0.5
    if name in ("dpo", "minor_sft") or options.get("beta"):
        extra["ref_logp"] = -torch.rand(batch, length, generator=generator) * 5
    output = getattr(fused_hybrid, f"{name}_loss")(
        hidden, weight, targets, loss_mask=loss_mask, backend=backend, **options, **extra
    )
    actual = grads(output.loss, [hidden, weight]) if output.loss.requires_grad else [None, None]
    leaves = [leaf64(hidden), leaf64(weight)]
    expected_loss = getattr(naive, name)(leaves[0], leaves[1], targets, loss_mask=loss_mask, **options, **extra)
    assert_close_scaled(output.loss, expected_loss, 1e-4, "loss", atol=1e-5)
    if actual[0] is not None and expected_loss.requires_grad:
        for label, got, want in zip(("d_hidden", "d_weight"), actual, grads(expected_loss, leaves)):
            assert_close_scaled(got, want if want is not None else torch.zeros_like(got), 1e-4, label, atol=1e-5)

"""Every objective against its naive float64 implementation (tests/naive_objectives.py), on both backends."""

from __future__ import annotations

import pytest
import torch

import fused_hybrid
from tests import naive_objectives as naive
from tests.reference import assert_close_scaled, grads, leaf64

BACKENDS = ["chunked", "torch", "triton"]
B, T, D, V = 6, 7, 16, 37


def make_batch(dtype=torch.float32, batch=B, length=T, ignore_fraction=0.2):
    hidden = torch.randn(batch, length, D).to(dtype).requires_grad_()
    weight = (torch.randn(V, D) * 2 / D**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (batch, length))
    targets[torch.rand(batch, length) < ignore_fraction] = -100
    loss_mask = (torch.rand(batch, length) > 0.15).long()
    loss_mask[:, 0] = 0  # a prompt token
    return hidden, weight, targets, loss_mask


def rollout_inputs(targets):
    return dict(
        advantages=torch.randn(targets.shape[0]),
        old_logp=-torch.rand(targets.shape) * 4,
    )


def compare(fused_fn, naive_fn, hidden, weight, targets, rel=1e-4, loss_atol=1e-6, **kwargs):
    """Loss and grads of hidden and weight: fused (given dtype) vs naive (float64 copies)."""
    output = fused_fn(hidden, weight, targets, **kwargs)
    assert isinstance(output, fused_hybrid.LossOutput)
    assert output.loss.dim() == 0 and torch.isfinite(output.loss)
    for name, value in output.metrics.items():
        assert isinstance(value, torch.Tensor) and not value.requires_grad and value.dim() == 0, name
    actual = grads(output.loss, [hidden, weight])
    naive_kwargs = {k: v for k, v in kwargs.items() if k not in ("backend", "num_items")}
    h64, w64 = leaf64(hidden), leaf64(weight)
    expected_loss = naive_fn(h64, w64, targets, **naive_kwargs)
    expected = grads(expected_loss, [h64, w64])
    assert_close_scaled(output.loss, expected_loss, rel, "loss", atol=loss_atol)
    for name, got, want in zip(("d_hidden", "d_weight"), actual, expected):
        assert_close_scaled(got, want, rel, name, atol=1e-7)
    return output


@pytest.mark.parametrize("backend", BACKENDS)
def test_dft(backend):
    hidden, weight, targets, loss_mask = make_batch()
    output = compare(fused_hybrid.dft_loss, naive.dft, hidden, weight, targets, loss_mask=loss_mask, backend=backend)
    assert 0 < output.metrics["mean_prob"] < 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", fused_hybrid.AGGREGATIONS)
def test_grpo_aggregations(backend, aggregation):
    hidden, weight, targets, loss_mask = make_batch()
    compare(
        fused_hybrid.grpo_loss,
        naive.grpo,
        hidden,
        weight,
        targets,
        loss_mask=loss_mask,
        aggregation=aggregation,
        backend=backend,
        **rollout_inputs(targets),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [
        dict(beta=0.05, entropy_coef=0.01, epsilon_high=0.28),
        dict(dual_clip=None, epsilon_low=0.1, temperature=0.8),
        dict(importance_sampling="sequence", epsilon_low=3e-4, epsilon_high=4e-4, aggregation="seq-mean-token-mean"),
        dict(per_token_advantages=True, softcap=5.0),
        dict(importance_sampling="sequence", per_token_advantages=True, epsilon_low=0.05, epsilon_high=0.05),
        dict(on_policy=True, entropy_coef=0.02),
    ],
)
def test_grpo_options(backend, options):
    hidden, weight, targets, loss_mask = make_batch()
    inputs = rollout_inputs(targets)
    if options.pop("per_token_advantages", False):
        inputs["advantages"] = torch.randn(targets.shape)
    if options.pop("on_policy", False):
        inputs["old_logp"] = None
    if options.get("beta"):
        inputs["ref_logp"] = -torch.rand(targets.shape) * 4
    output = compare(
        fused_hybrid.grpo_loss,
        naive.grpo,
        hidden,
        weight,
        targets,
        loss_mask=loss_mask,
        backend=backend,
        **inputs,
        **options,
    )
    assert {"clip_frac_low", "clip_frac_high", "mean_ratio", "approx_kl", "entropy", "policy_loss"} <= set(
        output.metrics
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_phi, cutoff_prob, mu", [(False, 1.0, 0.9), (True, 1.0, 0.1), (True, 0.4, 0.5)])
def test_chord(backend, use_phi, cutoff_prob, mu):
    hidden, weight, targets, loss_mask = make_batch()
    inputs = rollout_inputs(targets)
    is_expert = torch.tensor([True, False, False, True, False, False])
    inputs["old_logp"][is_expert] = float("nan")  # expert rows have no rollout policy: must be ignored
    output = compare(
        fused_hybrid.chord_loss,
        naive.chord,
        hidden,
        weight,
        targets,
        loss_mask=loss_mask,
        is_expert=is_expert,
        mu=mu,
        use_phi=use_phi,
        cutoff_prob=cutoff_prob,
        backend=backend,
        **inputs,
    )
    assert output.metrics["mu"] == pytest.approx(mu)
    if use_phi:
        assert 0 < output.metrics["mean_phi"] <= 0.25


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type, nll_weight", [("sigmoid", 0.0), ("sigmoid", 0.5), ("ipo", 0.0), ("simpo", 0.2)])
def test_dpo(backend, loss_type, nll_weight):
    hidden, weight, targets, loss_mask = make_batch()
    ref_logp = -torch.rand(targets.shape) * 4
    output = compare(
        fused_hybrid.dpo_loss,
        naive.dpo,
        hidden,
        weight,
        targets,
        loss_mask=loss_mask,
        ref_logp=ref_logp,
        loss_type=loss_type,
        nll_weight=nll_weight,
        backend=backend,
    )
    assert 0 <= output.metrics["reward_accuracy"] <= 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length_normalized", [False, True])
def test_minor_sft(backend, length_normalized):
    hidden, weight, targets, loss_mask = make_batch()
    ref_logp = -torch.rand(targets.shape) * 4
    output = compare(
        fused_hybrid.minor_sft_loss,
        naive.minor_sft,
        hidden,
        weight,
        targets,
        loss_mask=loss_mask,
        ref_logp=ref_logp,
        beta=0.3,
        length_normalized=length_normalized,
        backend=backend,
    )
    assert torch.isfinite(output.metrics["m_theta"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.95, 1.0])
def test_ift(backend, gamma):
    hidden, weight, targets, loss_mask = make_batch()
    compare(
        fused_hybrid.ift_loss, naive.ift, hidden, weight, targets, loss_mask=loss_mask, gamma=gamma, backend=backend
    )


def test_ift_with_gamma_zero_is_sequence_mean_sft():
    hidden, weight, targets, loss_mask = make_batch()
    ift = fused_hybrid.ift_loss(hidden, weight, targets, loss_mask=loss_mask, gamma=0.0).loss
    logp = fused_hybrid.linear_logprobs(hidden, weight, targets)
    mask = (targets != -100) & loss_mask.bool()
    per_seq = [(-logp[i][mask[i]]).mean() for i in range(B) if mask[i].any()]
    assert_close_scaled(ift, torch.stack(per_seq).mean(), 1e-6)


def test_minor_sft_gradient_equals_length_normalised_sft_at_the_reference():
    hidden, weight, targets, loss_mask = make_batch()
    with torch.no_grad():
        ref_logp = fused_hybrid.linear_logprobs(hidden, weight, targets)
    minor = fused_hybrid.minor_sft_loss(hidden, weight, targets, ref_logp=ref_logp, loss_mask=loss_mask).loss
    logp = fused_hybrid.linear_logprobs(hidden, weight, targets)
    mask = ((targets != -100) & loss_mask.bool()).float()
    sft = ((-logp * mask).sum(-1) / mask.sum(-1).clamp(min=1))[mask.sum(-1) > 0].mean()
    for got, want in zip(grads(minor, [hidden, weight]), grads(sft, [hidden, weight])):
        assert_close_scaled(got, want, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["dft", "grpo", "chord", "dpo", "minor_sft", "ift"])
def test_bf16_against_float64(backend, name):
    hidden, weight, targets, loss_mask = make_batch(torch.bfloat16)
    ref_logp = -torch.rand(targets.shape) * 4
    extra = {
        "dft": {},
        "grpo": rollout_inputs(targets),
        "chord": dict(is_expert=torch.arange(B) % 3 == 0, mu=0.3, use_phi=True, **rollout_inputs(targets)),
        "dpo": dict(ref_logp=ref_logp),
        "minor_sft": dict(ref_logp=ref_logp),
        "ift": {},
    }[name]
    # A policy loss is a mean of +-A r_t terms that nearly cancel: judge its error on the terms' scale (bf16 log-probs
    # are ~1e-2 off, and so are the ratios), not on the small net value.
    loss_atol = 1e-2 * extra["advantages"].abs().mean().item() if "advantages" in extra else 1e-6
    compare(
        getattr(fused_hybrid, f"{name}_loss"),
        getattr(naive, name),
        hidden,
        weight,
        targets,
        rel=4e-2,
        loss_atol=loss_atol,
        loss_mask=loss_mask,
        backend=backend,
        **extra,
    )


def test_packed_layout_equals_padded_layout():
    hidden, weight, targets, loss_mask = make_batch()
    inputs = rollout_inputs(targets)
    padded = fused_hybrid.grpo_loss(
        hidden,
        weight,
        targets,
        loss_mask=loss_mask,
        aggregation="seq-mean-token-mean",
        importance_sampling="sequence",
        **inputs,
    ).loss
    lengths = torch.randint(1, T + 1, (B,))
    lengths[2] = T
    keep = torch.arange(T)[None, :] < lengths[:, None]
    full_mask = loss_mask * keep  # tokens beyond each length are padding: not in the loss either way
    padded = fused_hybrid.grpo_loss(
        hidden,
        weight,
        targets,
        loss_mask=full_mask,
        aggregation="seq-mean-token-mean",
        importance_sampling="sequence",
        **inputs,
    ).loss
    packed = fused_hybrid.grpo_loss(
        hidden[keep],
        weight,
        targets[keep],
        loss_mask=full_mask[keep],
        sequence_ids=torch.arange(B)[:, None].expand(B, T)[keep],
        num_sequences=B,
        aggregation="seq-mean-token-mean",
        importance_sampling="sequence",
        advantages=inputs["advantages"],
        old_logp=inputs["old_logp"][keep],
    ).loss
    assert_close_scaled(packed, padded, 1e-6)


def test_sequence_logps_helper_matches_sums():
    hidden, weight, targets, loss_mask = make_batch()
    sums = fused_hybrid.sequence_logps(hidden, weight, targets, loss_mask=loss_mask)
    assert not sums.requires_grad
    logp = fused_hybrid.linear_logprobs(hidden, weight, targets).detach()
    assert_close_scaled(sums, (logp * loss_mask).sum(-1), 1e-6)
    # per-sequence sums and per-token reference log-probs give the same DPO loss
    ref_tokens = -torch.rand(targets.shape) * 3
    ref_sums = (ref_tokens * ((targets != -100) & loss_mask.bool())).sum(-1)
    by_tokens = fused_hybrid.dpo_loss(hidden, weight, targets, loss_mask=loss_mask, ref_logp=ref_tokens).loss
    by_sums = fused_hybrid.dpo_loss(hidden, weight, targets, loss_mask=loss_mask, ref_logp=ref_sums).loss
    assert_close_scaled(by_sums, by_tokens, 1e-6)


def near_policy_old_logp(hidden, weight, targets, spread=1.0):
    """Rollout log-probs within +-spread of the current ones: ratios on both sides of every clip bound."""
    with torch.no_grad():
        logp = fused_hybrid.linear_logprobs(hidden, weight, targets)
    return logp + (torch.rand(targets.shape) * 2 - 1) * spread


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [
        dict(),  # the paper's defaults: no effective lower bound, epsilon_high 0.28
        dict(epsilon_low=0.2, epsilon_high=0.2, beta=0.05, aggregation="seq-mean-token-mean"),
        dict(aggregation="seq-mean-token-sum-norm", temperature=0.8, softcap=4.0),
    ],
)
def test_cispo(backend, options):
    hidden, weight, targets, loss_mask = make_batch()
    old_logp = near_policy_old_logp(hidden, weight, targets)
    extra = dict(ref_logp=-torch.rand(targets.shape) * 3) if options.get("beta") else {}
    advantages = (
        torch.randn(targets.shape) if options.get("aggregation") == "seq-mean-token-sum-norm" else torch.randn(B)
    )
    output = compare(
        fused_hybrid.cispo_loss,
        naive.cispo,
        hidden,
        weight,
        targets,
        loss_mask=loss_mask,
        advantages=advantages,
        old_logp=old_logp,
        backend=backend,
        **options,
        **extra,
    )
    assert output.metrics["clip_frac_high"] > 0


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    """Unlike PPO, a token whose ratio is beyond the bound still gets -clip(r) * A * dlogp."""
    hidden, weight, targets, loss_mask = make_batch()
    with torch.no_grad():
        logp = fused_hybrid.linear_logprobs(hidden, weight, targets)
    old_logp = logp - 2.0  # every ratio e^2 > 1 + epsilon_high
    advantages = torch.rand(B) + 0.5
    cispo = fused_hybrid.cispo_loss(
        hidden, weight, targets, loss_mask=loss_mask, advantages=advantages, old_logp=old_logp
    ).loss
    grpo = fused_hybrid.grpo_loss(
        hidden, weight, targets, loss_mask=loss_mask, advantages=advantages, old_logp=old_logp
    ).loss
    assert all((g == 0).all() for g in grads(grpo, [hidden, weight]))  # PPO clips every token out
    reinforce = fused_hybrid.grpo_loss(hidden, weight, targets, loss_mask=loss_mask, advantages=advantages * 1.28).loss
    for got, want in zip(grads(cispo, [hidden, weight]), grads(reinforce, [hidden, weight])):
        assert_close_scaled(got, want, 1e-5)  # the weight is clipped to 1 + 0.28, the gradient kept


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [dict(), dict(epsilon_low=0.2, epsilon_high=0.3, temperature=0.7)])
def test_gmpo(backend, options):
    hidden, weight, targets, loss_mask = make_batch()
    old_logp = near_policy_old_logp(hidden, weight, targets)
    advantages = torch.randn(B)
    output = compare(
        fused_hybrid.gmpo_loss,
        naive.gmpo,
        hidden,
        weight,
        targets,
        loss_mask=loss_mask,
        advantages=advantages,
        old_logp=old_logp,
        backend=backend,
        **options,
    )
    assert 0 < output.metrics["clip_frac"] < 1


def test_gmpo_on_policy_is_the_sequence_mean_reinforce_gradient():
    """At ratio 1, d/dlogp_t of -A_i exp(mean_t log m_t) is -A_i / |o_i|: GRPO's seq-mean-token-mean gradient."""
    hidden, weight, targets, loss_mask = make_batch()
    advantages = torch.randn(B)
    gmpo = fused_hybrid.gmpo_loss(hidden, weight, targets, loss_mask=loss_mask, advantages=advantages).loss
    grpo = fused_hybrid.grpo_loss(
        hidden, weight, targets, loss_mask=loss_mask, advantages=advantages, aggregation="seq-mean-token-mean"
    ).loss
    for got, want in zip(grads(gmpo, [hidden, weight]), grads(grpo, [hidden, weight])):
        assert_close_scaled(got, want, 1e-5)

"""Objectives at the edges: extreme ratios, single-token and all-masked sequences, zero advantages, gradient
accumulation with global normalisers, the mu schedule, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import fused_hybrid
from tests import naive_objectives as naive
from tests.reference import assert_close_scaled, grads, leaf64
from tests.test_objectives import B, D, T, V, compare, make_batch, rollout_inputs

BACKENDS = ["chunked", "torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
def test_extreme_log_ratios(backend, importance_sampling):
    hidden, weight, targets, loss_mask = make_batch()
    loss_mask[:, 1:3] = 1  # the fixed log-ratios below are in the loss, so every clip surely fires
    targets[:, 1:3] = targets[:, 1:3].clamp(min=0)
    with torch.no_grad():
        logp = fused_hybrid.linear_logprobs(hidden, weight, targets)
    shift = torch.where(torch.rand(targets.shape) < 0.5, 30.0, -30.0)  # log-ratios beyond +-20
    shift[:, :3] = torch.tensor([2.0, -1.5, 1.4])  # ratios e^2 and e^1.4 > dual_clip = 3 with A < 0
    advantages = torch.tensor([-1.0, 1.0, -2.0, 0.5, -0.7, 1.3])
    output = compare(
        fused_hybrid.grpo_loss,
        naive.grpo,
        hidden,
        weight,
        targets,
        loss_mask=loss_mask,
        advantages=advantages,
        old_logp=logp - shift,
        importance_sampling=importance_sampling,
        backend=backend,
        beta=0.1,
        ref_logp=logp + shift,
    )
    if importance_sampling == "token":
        assert output.metrics["dual_clip_frac"] > 0
        assert output.metrics["clip_frac_low"] > 0 and output.metrics["clip_frac_high"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_sequences(backend):
    hidden, weight, targets, _ = make_batch()
    loss_mask = torch.zeros(targets.shape, dtype=torch.long)
    loss_mask[torch.arange(B), torch.randint(0, T, (B,))] = 1
    targets = targets.clamp(min=0)  # the one kept token of each sequence is a real target
    for name, extra in [
        ("grpo", dict(aggregation="seq-mean-token-mean", importance_sampling="sequence", **rollout_inputs(targets))),
        ("ift", dict(gamma=0.9)),
        ("minor_sft", dict(ref_logp=-torch.rand(targets.shape))),
        ("dpo", dict(ref_logp=-torch.rand(targets.shape), loss_type="ipo")),
    ]:
        compare(
            getattr(fused_hybrid, f"{name}_loss"),
            getattr(naive, name),
            hidden,
            weight,
            targets,
            loss_mask=loss_mask,
            backend=backend,
            **extra,
        )


def all_objectives(targets):
    ref_logp = -torch.rand(targets.shape) * 2
    return {
        "dft": {},
        "grpo": dict(
            aggregation="seq-mean-token-mean", beta=0.1, ref_logp=ref_logp, entropy_coef=0.01, **rollout_inputs(targets)
        ),
        "cispo": dict(aggregation="seq-mean-token-mean", beta=0.1, ref_logp=ref_logp, **rollout_inputs(targets)),
        "gmpo": rollout_inputs(targets),
        "chord": dict(is_expert=torch.arange(B) % 2 == 0, mu=0.5, use_phi=True, **rollout_inputs(targets)),
        "dpo": dict(ref_logp=ref_logp, nll_weight=0.1),
        "minor_sft": dict(ref_logp=ref_logp),
        "ift": {},
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_sequences_are_finite_and_excluded(backend):
    hidden, weight, targets, loss_mask = make_batch()
    loss_mask[1] = 0
    loss_mask[4] = 0
    for name, extra in all_objectives(targets).items():
        output = compare(
            getattr(fused_hybrid, f"{name}_loss"),
            getattr(naive, name),
            hidden,
            weight,
            targets,
            loss_mask=loss_mask,
            backend=backend,
            **extra,
        )
        for value in output.metrics.values():
            assert torch.isfinite(value)
        d_hidden = grads(
            getattr(fused_hybrid, f"{name}_loss")(
                hidden, weight, targets, loss_mask=loss_mask, backend=backend, **extra
            ).loss,
            [hidden],
        )[0]
        assert (d_hidden[1] == 0).all() and (d_hidden[4] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_batch_gives_zero_loss_and_zero_grads(backend):
    hidden, weight, targets, _ = make_batch()
    loss_mask = torch.zeros(targets.shape)
    for name, extra in all_objectives(targets).items():
        output = getattr(fused_hybrid, f"{name}_loss")(
            hidden, weight, targets, loss_mask=loss_mask, backend=backend, **extra
        )
        assert output.loss.item() == 0.0 or name == "dpo", name
        for value in output.metrics.values():
            assert torch.isfinite(value), name
        for g in grads(output.loss, [hidden, weight]):
            assert torch.isfinite(g).all() and (g == 0).all(), name


def test_dpo_on_empty_responses_is_finite():
    hidden, weight, targets, _ = make_batch()
    output = fused_hybrid.dpo_loss(hidden, weight, targets, loss_mask=torch.zeros(targets.shape), loss_type="simpo")
    assert output.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(0.5))))  # -log sigmoid(-gamma)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_advantages_give_zero_gradients(backend):
    hidden, weight, targets, loss_mask = make_batch()
    inputs = rollout_inputs(targets)
    inputs["advantages"] = torch.zeros(B)
    output = fused_hybrid.grpo_loss(hidden, weight, targets, loss_mask=loss_mask, backend=backend, **inputs)
    assert output.loss.item() == 0.0
    for g in grads(output.loss, [hidden, weight]):
        assert (g == 0).all()


def split_batch(parts, *tensors):
    """Split [B, ...] tensors (or None) into micro-batches of whole sequences."""
    return [[None if t is None else t[part] for t in tensors] for part in parts]


@pytest.mark.parametrize("aggregation", fused_hybrid.AGGREGATIONS)
def test_grpo_micro_batches_with_global_normaliser_equal_full_batch(aggregation):
    hidden, weight, targets, loss_mask = make_batch()
    inputs = rollout_inputs(targets)
    terms = dict(beta=0.1, entropy_coef=0.01)  # the KL and entropy terms too
    ref_logp = -torch.rand(targets.shape) * 3
    full = fused_hybrid.grpo_loss(
        hidden, weight, targets, loss_mask=loss_mask, aggregation=aggregation, ref_logp=ref_logp, **terms, **inputs
    ).loss
    full_grads = grads(full, [hidden, weight])
    mask = (targets != -100) & loss_mask.bool()
    num_items = mask.sum() if aggregation == "token-mean" else (mask.sum(-1) > 0).sum()
    parts = [slice(0, 2), slice(2, 5), slice(5, B)]
    total = 0
    for h, y, m, a, o, r in split_batch(
        parts, hidden, targets, loss_mask, inputs["advantages"], inputs["old_logp"], ref_logp
    ):
        total = (
            total
            + fused_hybrid.grpo_loss(
                h,
                weight,
                y,
                loss_mask=m,
                advantages=a,
                old_logp=o,
                ref_logp=r,
                aggregation=aggregation,
                num_items=num_items,
                **terms,
            ).loss
        )
    assert_close_scaled(total, full, 1e-5, atol=1e-6)
    for got, want in zip(grads(total, [hidden, weight]), full_grads):
        assert_close_scaled(got, want, 1e-5)


def test_other_objectives_accumulate_with_global_normalisers():
    """Every objective with every optional term on: micro-batches with the global counts sum to the full batch."""
    hidden, weight, targets, loss_mask = make_batch()
    mask = (targets != -100) & loss_mask.bool()
    ref_logp = -torch.rand(targets.shape)
    is_expert = torch.arange(B) % 2 == 0
    inputs = rollout_inputs(targets)
    pair_parts = [[0, 3], [1, 2, 4, 5]]  # DPO micro-batches keep pairs together (chosen i, rejected i + 3)
    seq_parts = [slice(0, 2), slice(2, B)]
    cases = {
        "dft": (dict(num_items=mask.sum()), {}, seq_parts),
        "minor_sft": (dict(num_items=(mask.sum(-1) > 0).sum()), dict(ref_logp=ref_logp), seq_parts),
        "ift": (dict(num_items=(mask.sum(-1) > 0).sum()), {}, seq_parts),
        "cispo": (dict(num_items=mask.sum()), dict(beta=0.1, ref_logp=ref_logp, **inputs), seq_parts),
        "gmpo": (dict(num_items=(mask.sum(-1) > 0).sum()), inputs, seq_parts),
        "dpo": (
            dict(num_items=B // 2, num_chosen_tokens=mask[: B // 2].sum()),
            dict(ref_logp=ref_logp, nll_weight=0.5),
            pair_parts,
        ),
        "chord": (
            dict(num_rollout_tokens=mask[~is_expert].sum(), num_expert_tokens=mask[is_expert].sum()),
            dict(is_expert=is_expert, mu=0.4, use_phi=True, **inputs),
            seq_parts,
        ),
    }
    for name, (normalisers, per_batch, parts) in cases.items():
        fn = getattr(fused_hybrid, f"{name}_loss")
        full = fn(hidden, weight, targets, loss_mask=loss_mask, **per_batch).loss
        total = 0
        for part in parts:
            sliced = {k: v[part] if isinstance(v, torch.Tensor) else v for k, v in per_batch.items()}
            total = (
                total + fn(hidden[part], weight, targets[part], loss_mask=loss_mask[part], **sliced, **normalisers).loss
            )
        assert_close_scaled(total, full, 1e-5, name, atol=1e-6)
        for got, want in zip(grads(total, [hidden, weight]), grads(full, [hidden, weight])):
            assert_close_scaled(got, want, 1e-5, name)


def test_mu_schedule_breakpoints():
    schedule = fused_hybrid.MuSchedule(warmup_steps=10, decay_steps=20, peak=0.8, valley=0.1)
    assert schedule(0) == 0.0
    assert schedule(5) == pytest.approx(0.4)
    assert schedule(10) == pytest.approx(0.8)
    assert schedule(20) == pytest.approx(0.45)  # half-way down the cosine
    assert schedule(30) == pytest.approx(0.1)
    assert schedule(1000) == pytest.approx(0.1)
    assert fused_hybrid.MuSchedule(0, 0, 0.9, 0.05)(0) == pytest.approx(0.05)
    chord_mu = fused_hybrid.CHORDLoss.chord_mu()
    assert chord_mu.mu_at(0) == pytest.approx(0.9) and chord_mu.mu_at(200) == pytest.approx(0.05)
    assert chord_mu.mu_at(100) == pytest.approx(0.475)
    chord_phi = fused_hybrid.CHORDLoss.chord_phi()
    assert chord_phi.mu_at(None) == 0.1 and chord_phi.options["use_phi"]


def test_modules_return_the_loss_and_keep_metrics():
    hidden, weight, targets, loss_mask = make_batch()
    inputs = rollout_inputs(targets)
    loss_fn = fused_hybrid.CHORDLoss.chord_mu()
    loss = loss_fn(hidden, weight, targets, loss_mask=loss_mask, is_expert=torch.arange(B) < 2, step=50, **inputs)
    expected = fused_hybrid.chord_loss(
        hidden, weight, targets, loss_mask=loss_mask, is_expert=torch.arange(B) < 2, mu=loss_fn.mu_at(50), **inputs
    )
    assert torch.equal(loss, expected.loss)
    assert loss_fn.metrics.keys() == expected.metrics.keys()
    assert loss_fn.metrics["mu"] == pytest.approx(loss_fn.mu_at(50))
    modules = [
        (fused_hybrid.DFTLoss(), {}),
        (fused_hybrid.GRPOLoss(aggregation="seq-mean-token-sum"), inputs),
        (fused_hybrid.DPOLoss(loss_type="simpo"), {}),
        (fused_hybrid.MinorSFTLoss(), dict(ref_logp=-torch.rand(targets.shape))),
        (fused_hybrid.IFTLoss(gamma=0.5), {}),
        (fused_hybrid.CISPOLoss(epsilon_high=0.3, temperature=0.9), inputs),
        (fused_hybrid.GMPOLoss(), inputs),
    ]
    for module, extra in modules:
        value = module(hidden, weight, targets, loss_mask=loss_mask, **extra)
        assert value.dim() == 0 and value.requires_grad and module.metrics


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda b: fused_hybrid.grpo_loss(*b, advantages=None), ValueError, "advantages is required"),
        (lambda b: fused_hybrid.grpo_loss(*b, advantages=torch.randn(B), beta=0.1), ValueError, "ref_logp is required"),
        (lambda b: fused_hybrid.grpo_loss(*b, advantages=torch.randn(B + 1)), ValueError, "advantages must have shape"),
        (
            lambda b: fused_hybrid.grpo_loss(*b, advantages=torch.randn(B), old_logp=torch.randn(B, T + 1)),
            ValueError,
            "old_logp must have shape",
        ),
        (lambda b: fused_hybrid.grpo_loss(*b, advantages=torch.randn(B), epsilon_low=-0.1), ValueError, "epsilon_low"),
        (
            lambda b: fused_hybrid.grpo_loss(*b, advantages=torch.randn(B), epsilon_high=-1.0),
            ValueError,
            "epsilon_high",
        ),
        (lambda b: fused_hybrid.grpo_loss(*b, advantages=torch.randn(B), beta=-1.0), ValueError, "beta"),
        (lambda b: fused_hybrid.grpo_loss(*b, advantages=torch.randn(B), dual_clip=0.5), ValueError, "dual_clip"),
        (
            lambda b: fused_hybrid.grpo_loss(*b, advantages=torch.randn(B), aggregation="mean"),
            ValueError,
            "aggregation must be one of",
        ),
        (
            lambda b: fused_hybrid.grpo_loss(*b, advantages=torch.randn(B), importance_sampling="seq"),
            ValueError,
            "importance_sampling must be one of",
        ),
        (
            lambda b: fused_hybrid.grpo_loss(
                b[0][0], b[1], b[2][0], advantages=torch.randn(T), importance_sampling="sequence"
            ),
            ValueError,
            "needs sequences",
        ),
        (
            lambda b: fused_hybrid.chord_loss(
                *b, is_expert=torch.ones(B, dtype=torch.bool), mu=1.5, advantages=torch.randn(B)
            ),
            ValueError,
            "mu must lie in [0, 1]",
        ),
        (
            lambda b: fused_hybrid.chord_loss(*b, is_expert=torch.ones(B, dtype=torch.bool), mu=0.5),
            ValueError,
            "advantages is required",
        ),
        (
            lambda b: fused_hybrid.chord_loss(*b, is_expert=torch.ones(B + 1), mu=0.5, advantages=torch.randn(B)),
            ValueError,
            "is_expert must have shape",
        ),
        (
            lambda b: fused_hybrid.dpo_loss(b[0][:5], b[1], b[2][:5], loss_type="simpo"),
            ValueError,
            "even number of sequences",
        ),
        (lambda b: fused_hybrid.dpo_loss(*b), ValueError, "ref_logp is required"),
        (lambda b: fused_hybrid.dpo_loss(*b, loss_type="kto", ref_logp=torch.randn(B)), ValueError, "loss_type"),
        (lambda b: fused_hybrid.dpo_loss(*b, beta=-0.1, ref_logp=torch.randn(B)), ValueError, "beta"),
        (lambda b: fused_hybrid.minor_sft_loss(*b, ref_logp=None), ValueError, "ref_logp is required"),
        (lambda b: fused_hybrid.minor_sft_loss(*b, ref_logp=torch.randn(B), beta=0.0), ValueError, "beta"),
        (lambda b: fused_hybrid.ift_loss(*b, gamma=1.5), ValueError, "gamma"),
        (lambda b: fused_hybrid.dft_loss(*b, reduction="batchmean"), ValueError, "reduction must be one of"),
        (lambda b: fused_hybrid.dft_loss(*b, loss_mask=torch.ones(B, T + 1)), ValueError, "loss_mask must have"),
        (lambda b: fused_hybrid.MuSchedule(warmup_steps=-1), ValueError, "warmup_steps"),
        (lambda b: fused_hybrid.MuSchedule(peak=1.2), ValueError, "peak must lie in [0, 1]"),
        (
            lambda b: fused_hybrid.CHORDLoss.chord_mu()(
                *b, is_expert=torch.ones(B, dtype=torch.bool), advantages=torch.randn(B)
            ),
            ValueError,
            "step is required",
        ),
    ],
)
def test_bad_input_is_named(call, error, words):
    hidden, weight, targets, _ = make_batch()
    with pytest.raises(error) as info:
        call((hidden, weight, targets))
    assert words in str(info.value)


def test_grpo_on_policy_first_step_matches_reinforce_gradient():
    """With old_logp = None the ratio is 1: the gradient is that of -A * logp (token-mean)."""
    hidden, weight, targets, loss_mask = make_batch()
    advantages = torch.randn(B)
    grpo = fused_hybrid.grpo_loss(hidden, weight, targets, loss_mask=loss_mask, advantages=advantages).loss
    h64, w64 = leaf64(hidden), leaf64(weight)
    logp, _, mask = naive.token_terms(h64, w64, targets, loss_mask)
    reinforce = -(advantages.double()[:, None] * logp)[mask].sum() / mask.sum()
    for got, want in zip(grads(grpo, [hidden, weight]), grads(reinforce, [h64, w64])):
        assert_close_scaled(got, want, 1e-4)


def poison_outside(values: torch.Tensor, in_loss: torch.Tensor, poison: float) -> torch.Tensor:
    return torch.where(in_loss, values, torch.full_like(values, poison))


@pytest.mark.parametrize("poison", [float("nan"), float("-inf"), float("inf")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_outside_the_loss_changes_nothing(backend, poison):
    """Real RL pipelines leave NaN / inf in old_logp, ref_logp and advantages on prompt and padding tokens, and in
    per-sequence inputs of sequences without a loss token: masks must select, so the loss and gradients are those
    of clean inputs."""
    hidden, weight, targets, loss_mask = make_batch()
    loss_mask[4] = 0  # a sequence with no loss token
    in_loss = (targets != -100) & loss_mask.bool()
    has_tokens = in_loss.any(-1)
    clean = all_objectives(targets)
    clean["grpo"]["advantages"] = torch.randn(targets.shape)  # per token
    clean["dpo"]["ref_logp"] = -torch.rand(B) * 5  # per-sequence sums
    clean["minor_sft"]["ref_logp"] = -torch.rand(B) * 5
    clean["chord"]["use_phi"] = False
    for name, extra in clean.items():
        dirty = dict(extra)
        for key in ("old_logp", "ref_logp", "advantages"):
            value = extra.get(key)
            if value is None:
                continue
            dirty[key] = poison_outside(value, in_loss if value.shape == targets.shape else has_tokens, poison)
        fn = getattr(fused_hybrid, f"{name}_loss")
        expected = fn(hidden, weight, targets, loss_mask=loss_mask, backend=backend, **extra)
        got = fn(hidden, weight, targets, loss_mask=loss_mask, backend=backend, **dirty)
        assert torch.isfinite(got.loss), name
        assert torch.equal(got.loss, expected.loss), name
        for key, value in got.metrics.items():
            assert torch.equal(value, expected.metrics[key]), f"{name}: metric {key}"
        for g, want in zip(grads(got.loss, [hidden, weight]), grads(expected.loss, [hidden, weight])):
            assert torch.equal(g, want), name


def test_no_loss_makes_a_device_tensor_from_a_python_number(monkeypatch):
    """torch.tensor / torch.as_tensor of a Python number is a blocking host-to-device copy on CUDA (and breaks
    CUDA-graph capture): no loss may do it, forward or backward, whatever its options."""
    calls = []
    for name in ("tensor", "as_tensor", "scalar_tensor"):
        original = getattr(torch, name)

        def recording(data, *args, _original=original, _name=name, **kwargs):
            if not isinstance(data, torch.Tensor):
                calls.append(f"torch.{_name}({data!r})")
            return _original(data, *args, **kwargs)

        monkeypatch.setattr(torch, name, recording)
    hidden, weight, targets, loss_mask = make_batch()
    mask = (targets != -100) & loss_mask.bool()
    counts = dict(
        dft=dict(num_items=int(mask.sum())),
        grpo=dict(num_items=int(mask.sum())),
        cispo=dict(num_items=5),
        gmpo=dict(num_items=5),
        chord=dict(num_rollout_tokens=17, num_expert_tokens=11),
        dpo=dict(num_items=3, num_chosen_tokens=13),
        minor_sft=dict(num_items=5),
        ift=dict(num_items=5),
    )
    for name, extra in all_objectives(targets).items():
        for options in ({}, counts[name]):
            calls.clear()
            output = getattr(fused_hybrid, f"{name}_loss")(
                hidden, weight, targets, loss_mask=loss_mask, **extra, **options
            )
            grads(output.loss, [hidden, weight])
            assert calls == [], f"{name} {options}: {calls}"
    calls.clear()
    loss = fused_hybrid.linear_cross_entropy(hidden, weight, targets, num_items=40, label_smoothing=0.1, z_loss=1e-3)
    grads(loss, [hidden, weight])
    assert calls == []


@pytest.mark.parametrize(
    "sequence_ids, words",
    [
        ([0, 0, 1, 1, 2, 2, 3], "must lie in [0, num_sequences) = [0, 3); found 3"),
        ([0, 0, -1, 1, 1, 2, 2], "found -1"),
        ([0, 0, 1, 1, 0, 2, 2], "must be non-decreasing"),
        ([0, 1, 2, 1, 2, 2, 2], "id 1 follows id 2"),
    ],
)
def test_packed_sequence_ids_are_validated(sequence_ids, words):
    hidden, weight = torch.randn(7, D), torch.randn(V, D)
    targets = torch.randint(0, V, (7,))
    with pytest.raises(ValueError, match="sequence_ids") as info:
        fused_hybrid.ift_loss(hidden, weight, targets, sequence_ids=torch.tensor(sequence_ids), num_sequences=3)
    assert words in str(info.value)
    # a sequence with no tokens at all (id 1 absent) is a valid, empty sequence
    ids = torch.tensor([0, 0, 0, 2, 2, 2, 2])
    output = fused_hybrid.ift_loss(hidden, weight, targets, sequence_ids=ids, num_sequences=3)
    assert torch.isfinite(output.loss)


def test_a_head_spec_and_its_keywords_give_the_same_loss():
    hidden, weight = torch.randn(2, 5, 8), torch.randn(13, 8)
    targets = torch.randint(0, 13, (2, 5))
    spec = fused_hybrid.HeadSpec(temperature=0.7, softcap=3.0, backend="torch")
    by_spec = fused_hybrid.dft_loss(hidden, weight, targets, head=spec).loss
    by_keywords = fused_hybrid.dft_loss(hidden, weight, targets, temperature=0.7, softcap=3.0, backend="torch").loss
    assert torch.equal(by_spec, by_keywords)
    overridden = fused_hybrid.dft_loss(hidden, weight, targets, head=spec, temperature=1.0).loss
    expected = fused_hybrid.dft_loss(hidden, weight, targets, softcap=3.0, backend="reference").loss
    assert_close_scaled(overridden, expected, 1e-5)


def test_modules_are_generated_from_their_function_and_check_options_when_built():
    hidden, weight, targets, loss_mask = make_batch()
    inputs = rollout_inputs(targets)
    module = fused_hybrid.GRPOLoss(epsilon_high=0.28, beta=0.0, backend="torch")
    expected = fused_hybrid.grpo_loss(
        hidden, weight, targets, loss_mask=loss_mask, epsilon_high=0.28, backend="torch", **inputs
    )
    assert torch.equal(module(hidden, weight, targets, loss_mask=loss_mask, **inputs), expected.loss)
    assert module.metrics.keys() == expected.metrics.keys()
    assert "grpo_loss" in type(module).__doc__
    with pytest.raises(ValueError, match="epsilon_low must be < 1"):
        fused_hybrid.GRPOLoss(epsilon_low=1.5)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        fused_hybrid.DPOLoss(loss_type="kto")
    with pytest.raises(TypeError, match=r"GMPOLoss got unknown option\(s\) \['dual_clip'\]"):
        fused_hybrid.GMPOLoss(dual_clip=3.0)
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['mu'\]"):
        fused_hybrid.DFTLoss()(hidden, weight, targets, mu=0.1)


@pytest.mark.parametrize(
    "objective, options",
    [
        (fused_hybrid.grpo_loss, dict(advantages=torch.randn(B), old_logp="per sequence")),
        (fused_hybrid.grpo_loss, dict(advantages=torch.randn(B), beta=0.1, ref_logp="per sequence")),
        (fused_hybrid.cispo_loss, dict(advantages=torch.randn(B), old_logp="per sequence")),
        (fused_hybrid.cispo_loss, dict(advantages=torch.randn(B), beta=0.1, ref_logp="per sequence")),
        (fused_hybrid.gmpo_loss, dict(advantages=torch.randn(B), old_logp="per sequence")),
        (
            fused_hybrid.chord_loss,
            dict(advantages=torch.randn(B), is_expert=torch.arange(B) < 1, mu=0.5, old_logp="per sequence"),
        ),
    ],
)
def test_a_per_sequence_log_prob_is_refused_not_spread_over_the_tokens(objective, options):
    """A rollout engine's summed sequence log-probs ([B]) are not per-token log-probs: broadcasting them to every
    token gave ratios of exp(logp_t - sum_t' logp_t')."""
    hidden, weight, targets, _ = make_batch()
    name = next(k for k, v in options.items() if v == "per sequence")
    options[name] = torch.randn(B) * T
    with pytest.raises(ValueError, match=rf"{name} must have shape \({B}, {T}\) \(per token\), one log-prob per token"):
        objective(hidden, weight, targets, **options)

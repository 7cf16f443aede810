"""KTO, ORPO and CPO (docs/objectives.md, "KTO, ORPO and CPO"): against float64 references written here from the
formulas (explicit loops, full logits) on every backend, against Liger-Kernel's chunked losses (peers), in both
layouts, under gradient accumulation, and with bad input refused before any kernel runs."""

from __future__ import annotations

import mpmath
import pytest
import torch
import torch.nn.functional as F
from liger_kernel.chunked_loss import LigerFusedLinearCPOLoss, LigerFusedLinearKTOLoss, LigerFusedLinearORPOLoss

import fused_hybrid
from fused_hybrid.engine import chunked
from fused_hybrid.objectives import OBJECTIVES, tokens
from fused_hybrid.objectives.preference import ORPO_MAX_MEAN_LOGP, log1mexp
from fused_hybrid.trainer import load_config
from tests.reference import assert_close_scaled, grads, leaf64, logprobs_entropy64

BACKENDS = ["chunked", "torch", "triton"]
P, T, D, V = 3, 7, 16, 37  # P pairs: 2P sequences of T tokens
S = 2 * P


def make_batch(sequences=S):
    """hidden, weight, bias, targets (some ignored) and a loss mask (prompt tokens off); every sequence keeps its
    last token in the loss, so that each has a mean log-prob (Liger's ORPO divides by the count)."""
    hidden = torch.randn(sequences, T, D, requires_grad=True)
    weight = (torch.randn(V, D) * 2 / D**0.5).requires_grad_()
    bias = (torch.randn(V) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (sequences, T))
    targets[torch.rand(sequences, T) < 0.2] = -100
    targets[:, -1] = torch.randint(0, V, (sequences,))
    loss_mask = torch.rand(sequences, T) > 0.15
    loss_mask[:, 0] = False
    loss_mask[:, -1] = True
    return hidden, weight, bias, targets, loss_mask


def kto_inputs(sequences=S):
    desirable = torch.rand(sequences) < 0.5
    desirable[:2] = torch.tensor([True, False])  # both kinds present
    return dict(desirable=desirable, ref_logp=-torch.rand(sequences, T) * 4, kl=torch.rand(()) * 2)


# ---------------------------------------------------------------------------------------- float64 references
def sums64(hidden, weight, bias, targets, loss_mask):
    """Per sequence: the float64 summed log-prob of its loss tokens (full logits) and its number of loss tokens."""
    logp, _ = logprobs_entropy64(hidden, weight, targets, bias)
    mask = (targets != -100) & loss_mask
    return [logp[i][mask[i]].sum() for i in range(len(logp))], [int(mask[i].sum()) for i in range(len(logp))]


def chosen_nll64(sums, lengths):
    return -sum(sums[:P]) / sum(lengths[:P])


def kto64(hidden, weight, bias, targets, loss_mask, *, desirable, ref_logp, kl, beta, **weights):
    sums, _ = sums64(hidden, weight, bias, targets, loss_mask)
    mask = (targets != -100) & loss_mask
    losses = []
    for i in range(len(sums)):
        log_ratio = sums[i] - ref_logp[i][mask[i]].double().sum()
        if desirable[i]:
            losses.append(weights["desirable_weight"] * (1 - torch.sigmoid(beta * (log_ratio - kl))))
        else:
            losses.append(weights["undesirable_weight"] * (1 - torch.sigmoid(beta * (kl - log_ratio))))
    return sum(losses) / len(losses)


def orpo64(hidden, weight, bias, targets, loss_mask, *, beta):
    sums, lengths = sums64(hidden, weight, bias, targets, loss_mask)

    def log_odds(i):
        mean = torch.clamp(sums[i] / max(lengths[i], 1), max=ORPO_MAX_MEAN_LOGP)
        return mean - torch.log(1 - torch.exp(mean))  # float64: exact enough at these log-probs

    odds_ratio_losses = [-F.logsigmoid(log_odds(i) - log_odds(P + i)) for i in range(P)]
    return chosen_nll64(sums, lengths) + beta * sum(odds_ratio_losses) / P


def cpo64(hidden, weight, bias, targets, loss_mask, *, beta, label_smoothing, nll_weight):
    sums, lengths = sums64(hidden, weight, bias, targets, loss_mask)
    losses = []
    for i in range(P):
        h = beta * (sums[i] - sums[P + i])
        losses.append(-(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h))
    return sum(losses) / P + nll_weight * chosen_nll64(sums, lengths)


def against_float64(fused_fn, reference_fn, options, inputs=None, backend="chunked", rel=1e-4):
    """Loss and gradients of hidden, weight and bias: `fused_fn` in fp32 against `reference_fn` on float64 copies."""
    hidden, weight, bias, targets, loss_mask = make_batch()
    inputs = inputs or {}
    output = fused_fn(hidden, weight, targets, bias, loss_mask=loss_mask, backend=backend, **inputs, **options)
    for name, value in output.metrics.items():
        assert not value.requires_grad and value.dim() == 0 and torch.isfinite(value), name
    leaves64 = [leaf64(t) for t in (hidden, weight, bias)]
    expected = reference_fn(*leaves64, targets, loss_mask, **inputs, **options)
    assert_close_scaled(output.loss, expected, rel, "loss", atol=1e-6)
    for name, got, want in zip(
        ("d_hidden", "d_weight", "d_bias"), grads(output.loss, [hidden, weight, bias]), grads(expected, leaves64)
    ):
        assert_close_scaled(got, want, rel, name, atol=1e-7)
    return output, (hidden, weight, bias, targets, loss_mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [
        dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0),
        dict(beta=0.7, desirable_weight=1.33, undesirable_weight=0.5),
    ],
)
def test_kto_against_float64(backend, options):
    inputs = kto_inputs()
    output, (hidden, weight, bias, targets, loss_mask) = against_float64(
        fused_hybrid.kto_loss, kto64, options, inputs, backend
    )
    # TRL's metrics: beta times the log-ratio, averaged over each kind; kl is the reference point used
    with torch.no_grad():
        sums, _ = sums64(hidden, weight, bias, targets, loss_mask)
        mask = (targets != -100) & loss_mask
        rewards = torch.stack([options["beta"] * (sums[i] - inputs["ref_logp"][i][mask[i]].sum()) for i in range(S)])
    desirable = inputs["desirable"]
    assert_close_scaled(output.metrics["reward_chosen"], rewards[desirable].mean(), 1e-4)
    assert_close_scaled(output.metrics["reward_rejected"], rewards[~desirable].mean(), 1e-4)
    margins = torch.where(desirable, rewards - options["beta"] * inputs["kl"], options["beta"] * inputs["kl"] - rewards)
    assert output.metrics["reward_accuracy"] == pytest.approx((margins > 0).double().mean().item())
    assert output.metrics["kl"] == inputs["kl"]


def test_kto_without_a_kl_estimate_is_the_zero_reference_point():
    hidden, weight, bias, targets, loss_mask = make_batch()
    inputs = kto_inputs()
    losses = [
        fused_hybrid.kto_loss(hidden, weight, targets, bias, loss_mask=loss_mask, **{**inputs, "kl": kl}).loss
        for kl in (None, 0.0, torch.zeros(()), inputs["kl"])
    ]
    assert losses[0] == losses[1] == losses[2] != losses[3]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.1, 0.8])
def test_orpo_against_float64(backend, beta):
    output, _ = against_float64(fused_hybrid.orpo_loss, orpo64, dict(beta=beta), backend=backend)
    assert output.metrics["log_odds_ratio"] < 0 and 0 <= output.metrics["reward_accuracy"] <= 1
    assert output.loss.item() == pytest.approx((output.metrics["nll_loss"] + output.metrics["preference_loss"]).item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [
        dict(beta=0.1, label_smoothing=0.0, nll_weight=1.0),
        dict(beta=0.5, label_smoothing=0.2, nll_weight=0.0),
        dict(beta=0.3, label_smoothing=0.1, nll_weight=0.4),
    ],
)
def test_cpo_against_float64(backend, options):
    against_float64(fused_hybrid.cpo_loss, cpo64, options, backend=backend)


def test_log1mexp_keeps_its_accuracy_near_zero():
    x = -torch.logspace(-8, 1.5, 200).float()
    mpmath.mp.dps = 40  # the exact values, from the fp32 inputs
    exact = torch.tensor([float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in x.double().tolist()])
    relative_error = ((log1mexp(x).double() - exact).abs() / exact.abs()).max()
    assert relative_error < 1e-6
    naive = torch.log1p(-torch.exp(x)).double()  # what it replaces: -inf where exp(x) rounds to 1
    assert ((naive - exact).abs() / exact.abs()).max() > 1e-2
    leaf = x.float().requires_grad_()
    assert torch.isfinite(torch.autograd.grad(log1mexp(leaf).sum(), leaf)[0]).all()


def test_orpo_stays_finite_when_a_response_has_no_loss_token():
    hidden, weight, bias, targets, loss_mask = make_batch()
    loss_mask[0] = False  # the first chosen response: S_bar = 0, infinite odds without the cap
    output = fused_hybrid.orpo_loss(hidden, weight, targets, bias, loss_mask=loss_mask)
    assert torch.isfinite(output.loss) and all(torch.isfinite(g).all() for g in grads(output.loss, [hidden, weight]))


# ----------------------------------------------------------------------------------- Liger-Kernel 0.8.5 peers
# Liger takes no loss_mask: the masked tokens become ignored targets for both. Liger's ORPO and CPO modules take
# (weight, hidden, ...), its KTO (hidden, weight, ...); all stack the P chosen sequences before the P rejected
# ones, as ours do, and divide as TRL does (pairs, sequences, the chosen half's loss tokens for the NLL).
def liger_batch():
    hidden, weight, bias, targets, loss_mask = make_batch()
    return hidden, weight, bias, torch.where(loss_mask, targets, -100)


def assert_same_as_liger(ours, liger, leaves):
    assert_close_scaled(ours, liger, 1e-5, "loss", atol=1e-6)
    for name, got, want in zip(("d_hidden", "d_weight", "d_bias"), grads(ours, leaves), grads(liger, leaves)):
        assert_close_scaled(got, want, 1e-4, name, atol=1e-7)


def test_kto_matches_liger():
    hidden, weight, bias, targets = liger_batch()
    ref_hidden, ref_weight, ref_bias = torch.randn(S, T, D), weight.detach() + 0.1 * torch.randn(V, D), torch.randn(V)
    inputs = kto_inputs()
    # Liger runs the reference head itself (use_ref_model=True); ours takes its per-sequence sums. Liger's kl is
    # TRL's detached scalar; its weights are fixed at 1 (TRL's defaults), its log-probs summed (TRL's).
    ref_logp = fused_hybrid.sequence_logps(ref_hidden, ref_weight, targets, ref_bias)
    ours = fused_hybrid.kto_loss(
        hidden, weight, targets, bias, desirable=inputs["desirable"], ref_logp=ref_logp, kl=inputs["kl"]
    )
    liger, liger_metrics = LigerFusedLinearKTOLoss(compiled=False, use_ref_model=True)(
        hidden,
        weight,
        targets,
        bias,
        preference_labels=inputs["desirable"],
        ref_input=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
        kl=inputs["kl"],
    )
    assert_same_as_liger(ours.loss, liger, [hidden, weight, bias])
    chosen_reward_sum, rejected_reward_sum = liger_metrics[4], liger_metrics[5]  # sums: ours are means
    desirable = inputs["desirable"]
    # a reward is a difference of two sums of log-probs: an absolute tolerance for its cancellation
    assert_close_scaled(ours.metrics["reward_chosen"], chosen_reward_sum / desirable.sum(), 1e-5, atol=1e-6)
    assert_close_scaled(ours.metrics["reward_rejected"], rejected_reward_sum / (~desirable).sum(), 1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.6])
def test_orpo_matches_liger(beta):
    hidden, weight, bias, targets = liger_batch()
    ours = fused_hybrid.orpo_loss(hidden, weight, targets, bias, beta=beta)
    # Liger's ORPO: length-normalised log-probs (its base's average_log_prob=True), NLL weight alpha = 1, beta on
    # the odds-ratio term: TRL's. Its metrics: (..., nll_loss, chosen rewards, rejected rewards, log_odds_ratio,
    # log_odds_chosen).
    liger, liger_metrics = LigerFusedLinearORPOLoss(beta=beta, compiled=False)(weight, hidden, targets, bias)
    assert_same_as_liger(ours.loss, liger, [hidden, weight, bias])
    nll, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = liger_metrics[4:9]
    assert_close_scaled(ours.metrics["nll_loss"], nll, 1e-5)
    assert_close_scaled(ours.metrics["reward_margin"], (chosen_rewards - rejected_rewards).mean(), 1e-4, atol=1e-6)
    assert_close_scaled(ours.metrics["log_odds_ratio"], log_odds_ratio, 1e-5)
    assert_close_scaled(ours.metrics["log_odds_chosen"], log_odds_chosen, 1e-4, atol=1e-6)


@pytest.mark.parametrize("label_smoothing, nll_weight", [(0.0, 1.0), (0.15, 0.3), (0.3, 0.0)])
def test_cpo_matches_liger(label_smoothing, nll_weight):
    hidden, weight, bias, targets = liger_batch()
    ours = fused_hybrid.cpo_loss(
        hidden, weight, targets, bias, beta=0.2, label_smoothing=label_smoothing, nll_weight=nll_weight
    )
    # Liger's CPO: summed log-probs (average_log_prob=False, TRL's sigmoid CPO), its alpha is our nll_weight
    # (TRL's cpo_alpha).
    liger, _ = LigerFusedLinearCPOLoss(beta=0.2, alpha=nll_weight, label_smoothing=label_smoothing, compiled=False)(
        weight, hidden, targets, bias
    )
    assert_same_as_liger(ours.loss, liger, [hidden, weight, bias])


# ------------------------------------------------------------------------------ layouts, accumulation, engine
def call(name, hidden, weight, targets, bias, **inputs):
    loss = {"kto": fused_hybrid.kto_loss, "orpo": fused_hybrid.orpo_loss, "cpo": fused_hybrid.cpo_loss}[name]
    options = {"cpo": dict(label_smoothing=0.1, nll_weight=0.5)}.get(name, {})
    return loss(hidden, weight, targets, bias, **inputs, **options)


def per_sequence_inputs(name):
    """KTO's inputs with per-sequence reference sums (the same in either layout and any split); none for the pair
    losses."""
    return {**kto_inputs(), "ref_logp": -torch.rand(S) * 20} if name == "kto" else {}


@pytest.mark.parametrize("name", ["kto", "orpo", "cpo"])
def test_packed_layout_equals_padded_layout(name):
    hidden, weight, bias, targets, loss_mask = make_batch()
    inputs = per_sequence_inputs(name)
    lengths = torch.randint(2, T + 1, (S,))
    keep = torch.arange(T)[None, :] < lengths[:, None]
    full_mask = loss_mask & keep
    padded = call(name, hidden, weight, targets, bias, loss_mask=full_mask, **inputs).loss
    packed = call(
        name,
        hidden[keep],
        weight,
        targets[keep],
        bias,
        loss_mask=full_mask[keep],
        sequence_ids=torch.arange(S)[:, None].expand(S, T)[keep],
        num_sequences=S,
        **inputs,
    ).loss
    assert_close_scaled(packed, padded, 1e-6)
    for label, a, b in zip(("d_hidden", "d_weight"), grads(packed, [hidden, weight]), grads(padded, [hidden, weight])):
        assert_close_scaled(a, b, 1e-5, label, atol=1e-8)


@pytest.mark.parametrize("name", ["kto", "orpo", "cpo"])
def test_micro_batches_with_global_counts_accumulate_to_the_full_batch(name):
    hidden, weight, bias, targets, loss_mask = make_batch()
    inputs = per_sequence_inputs(name)
    full = call(name, hidden, weight, targets, bias, loss_mask=loss_mask, **inputs).loss
    if name == "kto":  # any split of the sequences; num_items: every sequence of the step
        parts = [torch.tensor([0, 3]), torch.tensor([1, 2, 4, 5])]
        counts = dict(num_items=S)
    else:  # whole pairs, each micro-batch chosen-first; the step's pairs and chosen loss tokens
        parts = [torch.tensor([0, P]), torch.tensor([1, 2, P + 1, P + 2])]
        counts = dict(num_items=P, num_chosen_tokens=int(((targets != -100) & loss_mask)[:P].sum()))
    accumulated = 0
    for rows in parts:
        part_inputs = {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() == 1 else v for k, v in inputs.items()}
        accumulated = (
            accumulated
            + call(
                name, hidden[rows], weight, targets[rows], bias, loss_mask=loss_mask[rows], **part_inputs, **counts
            ).loss
        )
    assert_close_scaled(accumulated, full, 1e-6)
    leaves = [hidden, weight, bias]
    for label, a, b in zip(("d_hidden", "d_weight", "d_bias"), grads(accumulated, leaves), grads(full, leaves)):
        assert_close_scaled(a, b, 1e-5, label, atol=1e-8)


@pytest.mark.parametrize("name", ["kto", "orpo", "cpo"])
def test_the_gradient_is_formed_inside_the_forward(name, monkeypatch):
    """The declared plan ("sequence" for KTO, "pair" for ORPO and CPO) lets the chunked engine sweep once, chunks
    holding whole groups, and never recompute the logits; the gradients equal the two-pass path's."""
    hidden, weight, bias, targets, loss_mask = make_batch()
    inputs = per_sequence_inputs(name)
    two_pass = call(name, hidden, weight, targets, bias, loss_mask=loss_mask, backend="torch", **inputs).loss
    sweeps = []
    real_sweep = chunked.statistics_and_gradients
    monkeypatch.setattr(
        chunked, "statistics_and_gradients", lambda *a, **k: sweeps.append(k["groups"]) or real_sweep(*a, **k)
    )
    monkeypatch.setattr(chunked, "backward", lambda *a, **k: pytest.fail("the chunked engine recomputed logits"))
    fused = call(name, hidden, weight, targets, bias, loss_mask=loss_mask, backend="chunked", **inputs).loss
    sequence = torch.arange(S).repeat_interleave(T)
    assert len(sweeps) == 1 and torch.equal(sweeps[0], sequence if name == "kto" else sequence % P)
    leaves = [hidden, weight, bias]
    for label, a, b in zip(("d_hidden", "d_weight", "d_bias"), grads(fused, leaves), grads(two_pass, leaves)):
        assert_close_scaled(a, b, 1e-5, label, atol=1e-8)


# ------------------------------------------------------------------------------------------- the KL estimate
def test_kl_estimate_is_the_clamped_mean_log_ratio_of_the_mismatched_pairs():
    hidden, weight, bias, targets, loss_mask = make_batch()
    ref_logp = -torch.rand(S, T) * 4
    estimate = fused_hybrid.kto_kl_estimate(hidden, weight, targets, bias, ref_logp=ref_logp, loss_mask=loss_mask)
    assert not estimate.requires_grad and estimate.dim() == 0
    sums, _ = sums64(*(leaf64(t) for t in (hidden, weight, bias)), targets, loss_mask)
    mask = (targets != -100) & loss_mask
    mean_log_ratio = sum(sums[i] - ref_logp[i][mask[i]].double().sum() for i in range(S)) / S
    assert_close_scaled(estimate, mean_log_ratio.clamp(min=0), 1e-5, atol=1e-6)
    # a reference far more likely than the policy: a negative mean, clamped at 0
    assert (
        fused_hybrid.kto_kl_estimate(hidden, weight, targets, bias, ref_logp=torch.zeros(S), loss_mask=loss_mask) == 0
    )


# ------------------------------------------------------------------------------------------------ trainer modes
def test_the_preference_objectives_declare_what_the_trainer_gives_them():
    config = load_config(None)
    for name in ("orpo", "cpo"):
        objective = OBJECTIVES[name]
        assert objective.data_kind(config) == "preferences" and not objective.needs_reference(config)
        assert objective.gradient_plan() == "pair" and objective.batch_inputs == ()
        assert objective.normaliser_counts(config) == {"num_items": "pairs", "num_chosen_tokens": "chosen_tokens"}
    assert OBJECTIVES["orpo"].options(config, 0) == {"beta": 0.1}  # TRL's default where the config's beta is unset
    tuned = load_config(None, ["mode=cpo", "objective.cpo_alpha=0.5", "objective.cpo_label_smoothing=0.1"])
    assert OBJECTIVES["cpo"].options(tuned, 0) == {"beta": 0.1, "nll_weight": 0.5, "label_smoothing": 0.1}
    kto = OBJECTIVES["kto"]
    kto_config = load_config(None, ["mode=kto", "objective.undesirable_weight=1.5"])
    assert kto.data_kind(kto_config) == "unpaired" and kto.needs_reference(kto_config)
    assert kto.gradient_plan() == "sequence" and set(kto.batch_inputs) == {"desirable", "ref_logp", "kl"}
    assert kto.options(kto_config, 0) == {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.5}


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def no_head_runs(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the head ran before validation")

    monkeypatch.setattr(tokens, "linear_head_loss", forbidden)
    monkeypatch.setattr(tokens, "linear_head_stats", forbidden)


def kto_call(**change):
    hidden, weight, bias, targets, _ = make_batch()
    return fused_hybrid.kto_loss(hidden, weight, targets, bias, **{**kto_inputs(), **change})


def paired_call(loss, sequences=S, **options):
    hidden, weight, bias, targets, _ = make_batch(sequences)
    return loss(hidden, weight, targets, bias, **options)


@pytest.mark.parametrize(
    "make_call, error, words",
    [
        (lambda: kto_call(desirable=torch.ones(S)), TypeError, "desirable must be a bool tensor"),
        (lambda: kto_call(desirable=[True] * S), TypeError, "desirable must be a torch.Tensor"),
        (
            lambda: kto_call(desirable=torch.ones(S + 1, dtype=torch.bool)),
            ValueError,
            f"desirable must have shape ({S},)",
        ),
        (lambda: kto_call(desirable=torch.ones(S, 1, dtype=torch.bool)), ValueError, "desirable must have shape"),
        (lambda: kto_call(kl=-0.1), ValueError, "kl must be a finite number >= 0"),
        (lambda: kto_call(kl=float("nan")), ValueError, "kl must be a finite number >= 0"),
        (lambda: kto_call(kl=torch.tensor(-1.0)), ValueError, "kl must be a finite number >= 0"),
        (lambda: kto_call(kl=torch.tensor(float("inf"))), ValueError, "kl must be a finite number >= 0"),
        (lambda: kto_call(kl=torch.ones(2)), ValueError, "kl must be a scalar"),
        (lambda: kto_call(kl="0.1"), TypeError, "kl must be a number or a scalar tensor"),
        (lambda: kto_call(beta=0.0), ValueError, "beta must be a finite number > 0"),
        (lambda: kto_call(desirable_weight=-1.0), ValueError, "desirable_weight must be a finite number >= 0"),
        (lambda: kto_call(undesirable_weight=-0.5), ValueError, "undesirable_weight must be a finite number >= 0"),
        (lambda: kto_call(ref_logp=None), ValueError, "ref_logp is required"),
        (lambda: kto_call(num_items=-2), ValueError, "num_items must be a whole number"),
        (
            lambda: fused_hybrid.kto_loss(
                torch.randn(5, D),
                torch.randn(V, D),
                torch.randint(0, V, (5,)),
                desirable=torch.ones(5) > 0,
                ref_logp=torch.zeros(5),
            ),
            ValueError,
            "kto_loss needs sequences",
        ),
        (lambda: paired_call(fused_hybrid.orpo_loss, S - 1), ValueError, "orpo_loss needs an even number of sequences"),
        (lambda: paired_call(fused_hybrid.orpo_loss, beta=-0.1), ValueError, "beta must be a finite number > 0"),
        (lambda: paired_call(fused_hybrid.cpo_loss, S + 1), ValueError, "cpo_loss needs an even number of sequences"),
        (lambda: paired_call(fused_hybrid.cpo_loss, beta=0.0), ValueError, "beta must be a finite number > 0"),
        (
            lambda: paired_call(fused_hybrid.cpo_loss, label_smoothing=0.5),
            ValueError,
            "label_smoothing must lie in [0, 0.5)",
        ),
        (
            lambda: paired_call(fused_hybrid.cpo_loss, label_smoothing=-0.1),
            ValueError,
            "label_smoothing must lie in [0, 0.5)",
        ),
        (
            lambda: paired_call(fused_hybrid.cpo_loss, label_smoothing=None),
            TypeError,
            "label_smoothing must be a Python number",
        ),
        (
            lambda: paired_call(fused_hybrid.cpo_loss, nll_weight=-1.0),
            ValueError,
            "nll_weight must be a finite number >= 0",
        ),
        (
            lambda: paired_call(fused_hybrid.cpo_loss, num_chosen_tokens=1.5),
            ValueError,
            "num_chosen_tokens must be a whole number",
        ),
        (
            lambda: paired_call(fused_hybrid.dpo_loss, S - 1, loss_type="simpo"),
            ValueError,
            "dpo_loss needs an even number of sequences",
        ),
    ],
)
def test_bad_input_is_named_before_the_head_runs(no_head_runs, make_call, error, words):
    with pytest.raises(error) as info:
        make_call()
    assert words in str(info.value)


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda: fused_hybrid.KTOLoss(undesirable_weight=-1.0), "undesirable_weight must be a finite number >= 0"),
        (lambda: fused_hybrid.ORPOLoss(beta=0.0), "beta must be a finite number > 0"),
        (lambda: fused_hybrid.CPOLoss(label_smoothing=0.7), "label_smoothing must lie in [0, 0.5)"),
    ],
)
def test_modules_check_their_options_when_built(build, words):
    with pytest.raises(ValueError) as info:
        build()
    assert words in str(info.value)


def test_modules_return_the_functions_loss():
    hidden, weight, bias, targets, loss_mask = make_batch()
    inputs = kto_inputs()
    cases = [
        (fused_hybrid.KTOLoss(beta=0.3), fused_hybrid.kto_loss, dict(beta=0.3), inputs),
        (fused_hybrid.ORPOLoss(beta=0.2), fused_hybrid.orpo_loss, dict(beta=0.2), {}),
        (fused_hybrid.CPOLoss(label_smoothing=0.1), fused_hybrid.cpo_loss, dict(label_smoothing=0.1), {}),
    ]
    for module, function, options, extra in cases:
        value = module(hidden, weight, targets, bias, loss_mask=loss_mask, **extra)
        expected = function(hidden, weight, targets, bias, loss_mask=loss_mask, **extra, **options)
        assert torch.equal(value, expected.loss) and module.metrics.keys() == expected.metrics.keys()

"""Paired preference losses: the DPO family (docs/objectives.md, "Preference": sigmoid DPO, IPO and SimPO, with an
optional NLL term on the chosen responses), ORPO and CPO (docs/objectives.md, "KTO, ORPO and CPO").

Layout: a batch of 2P sequences, the P chosen responses first and then the P rejected ones in the same prompt
order (sequence i is chosen, sequence P + i its rejected twin), in either the [2P, T] or the packed layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..checks import check_non_negative, check_positive
from ..engine.head import HeadSpec
from ..reduction import check_num_items, divide_by_count, mean_count
from .registry import Objective, register
from .tokens import LossOutput, TokenBatch, TokenLayout, evaluate_head, evaluate_objective, objective_module

PREFERENCE_LOSSES = ("sigmoid", "ipo", "simpo")
# ORPO's odds need a mean log-prob below 0: a response with no loss token (S_bar = 0) or one the policy is certain
# of would have infinite odds; its S_bar is capped here (the fp32 mean log-prob is noise above it anyway).
ORPO_MAX_MEAN_LOGP = -1e-6


def policy_and_reference_sums(batch: TokenBatch, ref_logp: torch.Tensor | None, name: str = "ref_logp"):
    """Per-sequence sums of logp [S] and of `ref_logp` [S] (given per token or as per-sequence sums)."""
    policy = batch.seq_sum(batch.logp)
    if ref_logp is None:
        return policy, None
    if ref_logp.shape == batch.shape:
        reference = batch.seq_sum(batch.per_token(ref_logp, name))
    else:
        reference = batch.per_sequence(ref_logp, name).to(policy.dtype)
    return policy, reference


def count_pairs(layout: TokenLayout, why: str) -> int:
    """P for a layout of P chosen then P rejected sequences, checked before any kernel runs."""
    if layout.seq_index is None:
        raise ValueError(f"{why} needs sequences: pass targets of shape [B, T] or sequence_ids with num_sequences")
    if layout.num_sequences % 2:
        raise ValueError(
            f"{why} needs an even number of sequences (P chosen then P rejected), got {layout.num_sequences}"
        )
    return layout.num_sequences // 2


def mean_over_pairs(losses: torch.Tensor, pairs: int, num_items) -> torch.Tensor:
    """The per-pair losses [P] summed over P, or over the global ``num_items`` pairs."""
    return divide_by_count(losses.sum(), mean_count(pairs, num_items))


def chosen_nll(batch: TokenBatch, pairs: int, num_chosen_tokens) -> torch.Tensor:
    """Token-mean NLL of the chosen responses (sequences 0 .. P - 1), over their loss tokens or the global
    ``num_chosen_tokens``."""
    chosen = batch.restrict(batch.seq_index < pairs)
    count = mean_count(chosen.num_tokens(), num_chosen_tokens, name="num_chosen_tokens")
    return divide_by_count(chosen.keep(-batch.logp).sum(), count)


def smoothed_sigmoid_loss(margin: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """``-(1 - eps) log sigmoid(margin) - eps log sigmoid(-margin)``: the preference label trusted with
    probability 1 - eps (eps = 0: ``-log sigmoid(margin)``)."""
    loss = -F.logsigmoid(margin)
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-margin)
    return loss


def reward_metrics(rewards: torch.Tensor, pairs: int) -> dict[str, torch.Tensor]:
    """Means over pairs of the chosen and rejected responses' rewards [2P], their margin, and how often the
    chosen one's is higher."""
    rewards = rewards.detach()
    chosen, rejected = rewards[:pairs], rewards[pairs:]
    return {
        "reward_chosen": chosen.mean(),
        "reward_rejected": rejected.mean(),
        "reward_margin": (chosen - rejected).mean(),
        "reward_accuracy": (chosen > rejected).to(rewards.dtype).mean(),
    }


PAIR_METRIC_COUNTS = {
    "preference_loss": "sum",
    "nll_loss": "sum",
    "reward_chosen": "pairs",
    "reward_rejected": "pairs",
    "reward_margin": "pairs",
    "reward_accuracy": "pairs",
}


@torch.no_grad()
def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    loss_mask: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    head: HeadSpec | None = None,
    **head_options,
) -> torch.Tensor:
    """Summed log-probs of each sequence's loss tokens [S], through the fused kernel under no_grad.

    Feed it a reference model's hidden states and head to get the ``ref_logp`` of :func:`dpo_loss` and
    :func:`minor_sft_loss`.
    """
    head = HeadSpec.resolve(head, head_options)
    layout = TokenLayout.read(
        targets, head, loss_mask=loss_mask, sequence_ids=sequence_ids, num_sequences=num_sequences
    )
    batch = evaluate_head(hidden, weight, bias, layout, head=head)
    batch.require_sequences("sequence_logps")
    return batch.seq_sum(batch.logp)


def check_dpo_options(*, loss_type: str, beta: float, simpo_gamma: float, nll_weight: float) -> None:
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"loss_type must be one of {PREFERENCE_LOSSES}, got {loss_type!r}")
    check_positive("beta", beta)
    check_non_negative("simpo_gamma", simpo_gamma)
    check_non_negative("nll_weight", nll_weight)


def dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_logp: torch.Tensor | None = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    nll_weight: float = 0.0,
    loss_mask: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    num_items: int | torch.Tensor | None = None,
    num_chosen_tokens: int | torch.Tensor | None = None,
    head: HeadSpec | None = None,
    **head_options,
) -> LossOutput:
    """Preference loss over chosen/rejected pairs (chosen first, see the module docstring), mean over pairs.

    With ``S`` the summed and ``S_bar`` the length-normalised log-prob of a response (``R``, ``R_bar`` the same
    for the reference policy):

    - ``"sigmoid"`` (DPO): ``-log sigmoid(beta * ((S_w - R_w) - (S_l - R_l)))``;
    - ``"ipo"``: ``((S_bar_w - R_bar_w) - (S_bar_l - R_bar_l) - 1 / (2 beta))^2``;
    - ``"simpo"``: ``-log sigmoid(beta * (S_bar_w - S_bar_l) - simpo_gamma)`` (no reference).

    ``ref_logp`` (per token, or per-sequence sums from :func:`sequence_logps`) is required for sigmoid and IPO.
    ``nll_weight > 0`` adds that times the token-mean NLL of the chosen responses. A response with no loss token
    counts as log-prob 0 (length-normalised: 0 as well). For gradient accumulation each part takes its own global
    count, as CHORD's two parts do: ``num_items`` (pairs) for the preference loss and ``num_chosen_tokens`` (loss
    tokens of the chosen responses) for the NLL term.

    Metrics: ``preference_loss``, ``nll_loss``, ``reward_chosen``, ``reward_rejected``, ``reward_margin``,
    ``reward_accuracy`` (rewards: ``beta`` times the policy-reference log-ratio, or
    ``beta * S_bar`` for SimPO).
    """
    check_dpo_options(loss_type=loss_type, beta=beta, simpo_gamma=simpo_gamma, nll_weight=nll_weight)
    check_num_items(num_items)
    check_num_items(num_chosen_tokens, name="num_chosen_tokens")
    if loss_type != "simpo" and ref_logp is None:
        raise ValueError(f"ref_logp is required for loss_type={loss_type!r} (see sequence_logps)")

    def loss_of_batch(batch: TokenBatch) -> LossOutput:
        policy, reference = policy_and_reference_sums(batch, None if loss_type == "simpo" else ref_logp)
        lengths = batch.seq_tokens().clamp(min=1)
        if loss_type == "simpo":
            rewards = beta * policy / lengths
            losses = smoothed_sigmoid_loss(rewards[:pairs] - rewards[pairs:] - simpo_gamma)
        elif loss_type == "sigmoid":
            rewards = beta * (policy - reference)
            losses = smoothed_sigmoid_loss(rewards[:pairs] - rewards[pairs:])
        else:
            log_ratio = (policy - reference) / lengths
            rewards = beta * log_ratio
            losses = (log_ratio[:pairs] - log_ratio[pairs:] - 1.0 / (2.0 * beta)) ** 2
        preference = mean_over_pairs(losses, pairs, num_items)
        nll = chosen_nll(batch, pairs, num_chosen_tokens)
        loss = preference + nll_weight * nll if nll_weight > 0 else preference
        metrics = {"preference_loss": preference.detach(), "nll_loss": nll.detach(), **reward_metrics(rewards, pairs)}
        return LossOutput(loss, metrics)

    head = HeadSpec.resolve(head, head_options)
    layout = TokenLayout.read(
        targets, head, loss_mask=loss_mask, sequence_ids=sequence_ids, num_sequences=num_sequences
    )
    pairs = count_pairs(layout, "dpo_loss")
    plan = DPO.gradient_plan()
    return evaluate_objective(loss_of_batch, hidden, weight, bias, layout, head=head, plan=plan, inputs=(ref_logp,))


DPOLoss = objective_module("DPOLoss", dpo_loss, check_dpo_options)


# a sum of terms each depending on one pair's tokens (sequences i and i + P)
DPO = register(
    Objective(
        name="dpo",
        loss=dpo_loss,
        data="preferences",
        batch_inputs=("ref_logp",),
        normalisers={"num_items": "pairs", "num_chosen_tokens": "chosen_tokens"},
        options=lambda config, step: {
            "beta": config.objective.beta or 0.1,
            "loss_type": config.objective.dpo_loss_type,
        },
        needs_reference=lambda config: config.objective.dpo_loss_type != "simpo",
        gradient="pair",
        metric_counts=PAIR_METRIC_COUNTS,
    )
)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0 without cancellation: ``log(-expm1(x))`` above -log 2, ``log1p(-exp(x))``
    below (Maechler, "Accurately Computing log(1 - exp(-|a|))", 2012). The second branch is infinite where exp(x)
    rounds to 1, so it is fed a harmless value there: the branch not taken sends no NaN into the gradient."""
    near_zero = x > -math.log(2.0)
    below = torch.where(near_zero, -1.0, x)
    return torch.where(near_zero, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(below)))


def check_orpo_options(*, beta: float) -> None:
    check_positive("beta", beta)


def orpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_mask: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    num_items: int | torch.Tensor | None = None,
    num_chosen_tokens: int | torch.Tensor | None = None,
    head: HeadSpec | None = None,
    **head_options,
) -> LossOutput:
    """ORPO over chosen/rejected pairs (chosen first, see the module docstring), as TRL's ``ORPOTrainer``
    (docs/objectives.md, "KTO, ORPO and CPO"):

    ``L = NLL_w + beta * mean_pairs(-log sigmoid(log_odds_w - log_odds_l))``,
    ``log_odds = S_bar - log(1 - exp(S_bar))``

    with ``S_bar`` a response's length-normalised log-prob (the mean over its loss tokens, TRL's
    ``average_log_prob=True``), capped at ``ORPO_MAX_MEAN_LOGP`` so that the odds stay finite. As in TRL, ``beta``
    (the paper's lambda; default 0.1) weights the odds-ratio term and the NLL has weight 1; there is no reference
    model. ``NLL_w`` is the token-mean NLL over the chosen responses' loss tokens. For gradient accumulation
    ``num_items`` (pairs) and ``num_chosen_tokens`` replace the local counts.

    Metrics: ``preference_loss`` (the beta-weighted odds-ratio term), ``nll_loss``, ``log_odds_ratio`` (mean
    ``log sigmoid`` of the log odds ratio) and ``log_odds_chosen`` (its mean), as TRL names them, and
    ``reward_chosen``, ``reward_rejected``, ``reward_margin``, ``reward_accuracy`` (rewards ``beta * S_bar``).
    """
    check_orpo_options(beta=beta)
    check_num_items(num_items)
    check_num_items(num_chosen_tokens, name="num_chosen_tokens")

    def loss_of_batch(batch: TokenBatch) -> LossOutput:
        mean_logp = batch.seq_sum(batch.logp) / batch.seq_tokens().clamp(min=1)
        capped = mean_logp.clamp(max=ORPO_MAX_MEAN_LOGP)
        log_odds = capped - log1mexp(capped)
        log_odds_ratio = log_odds[:pairs] - log_odds[pairs:]
        preference = beta * mean_over_pairs(smoothed_sigmoid_loss(log_odds_ratio), pairs, num_items)
        nll = chosen_nll(batch, pairs, num_chosen_tokens)
        log_odds_ratio = log_odds_ratio.detach()
        metrics = {
            "preference_loss": preference.detach(),
            "nll_loss": nll.detach(),
            "log_odds_ratio": F.logsigmoid(log_odds_ratio).mean(),
            "log_odds_chosen": log_odds_ratio.mean(),
            **reward_metrics(beta * mean_logp, pairs),
        }
        return LossOutput(nll + preference, metrics)

    head = HeadSpec.resolve(head, head_options)
    layout = TokenLayout.read(
        targets, head, loss_mask=loss_mask, sequence_ids=sequence_ids, num_sequences=num_sequences
    )
    pairs = count_pairs(layout, "orpo_loss")
    return evaluate_objective(loss_of_batch, hidden, weight, bias, layout, head=head, plan=ORPO.gradient_plan())


ORPOLoss = objective_module("ORPOLoss", orpo_loss, check_orpo_options)


def check_cpo_options(*, beta: float, label_smoothing: float, nll_weight: float) -> None:
    check_positive("beta", beta)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a Python number, got {type(label_smoothing).__name__}")
    if not 0 <= label_smoothing < 0.5:  # at 0.5 the loss no longer prefers either response
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    check_non_negative("nll_weight", nll_weight)


def cpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    nll_weight: float = 1.0,
    loss_mask: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    num_items: int | torch.Tensor | None = None,
    num_chosen_tokens: int | torch.Tensor | None = None,
    head: HeadSpec | None = None,
    **head_options,
) -> LossOutput:
    """CPO over chosen/rejected pairs (chosen first, see the module docstring), as TRL's ``CPOTrainer`` with
    ``loss_type="sigmoid"`` (docs/objectives.md, "KTO, ORPO and CPO"):

    ``L = mean_pairs(-(1 - eps) log sigmoid(h) - eps log sigmoid(-h)) + nll_weight * NLL_w``,
    ``h = beta * (S_w - S_l)``

    with ``S`` a response's *summed* log-prob (TRL averages log-probs only for its IPO and SimPO loss types),
    ``eps = label_smoothing`` in [0, 0.5) (default 0), ``beta`` default 0.1, and ``nll_weight`` (TRL's
    ``cpo_alpha``) default 1.0 on ``NLL_w``, the token-mean NLL over the chosen responses' loss tokens. No
    reference model. For gradient accumulation ``num_items`` (pairs) and ``num_chosen_tokens`` replace the local
    counts.

    Metrics: ``preference_loss``, ``nll_loss``, ``reward_chosen``, ``reward_rejected``, ``reward_margin``,
    ``reward_accuracy`` (rewards ``beta * S``).
    """
    check_cpo_options(beta=beta, label_smoothing=label_smoothing, nll_weight=nll_weight)
    check_num_items(num_items)
    check_num_items(num_chosen_tokens, name="num_chosen_tokens")

    def loss_of_batch(batch: TokenBatch) -> LossOutput:
        rewards = beta * batch.seq_sum(batch.logp)
        losses = smoothed_sigmoid_loss(rewards[:pairs] - rewards[pairs:], label_smoothing)
        preference = mean_over_pairs(losses, pairs, num_items)
        nll = chosen_nll(batch, pairs, num_chosen_tokens)
        loss = preference + nll_weight * nll if nll_weight > 0 else preference
        metrics = {"preference_loss": preference.detach(), "nll_loss": nll.detach(), **reward_metrics(rewards, pairs)}
        return LossOutput(loss, metrics)

    head = HeadSpec.resolve(head, head_options)
    layout = TokenLayout.read(
        targets, head, loss_mask=loss_mask, sequence_ids=sequence_ids, num_sequences=num_sequences
    )
    pairs = count_pairs(layout, "cpo_loss")
    return evaluate_objective(loss_of_batch, hidden, weight, bias, layout, head=head, plan=CPO.gradient_plan())


CPOLoss = objective_module("CPOLoss", cpo_loss, check_cpo_options)


# ORPO and CPO: sums of terms each depending on one pair's tokens, the NLL one token's.
ORPO = register(
    Objective(
        name="orpo",
        loss=orpo_loss,
        data="preferences",
        normalisers={"num_items": "pairs", "num_chosen_tokens": "chosen_tokens"},
        options=lambda config, step: {"beta": config.objective.beta or 0.1},
        gradient="pair",
        metric_counts={**PAIR_METRIC_COUNTS, "log_odds_ratio": "pairs", "log_odds_chosen": "pairs"},
    )
)
CPO = register(
    Objective(
        name="cpo",
        loss=cpo_loss,
        data="preferences",
        normalisers={"num_items": "pairs", "num_chosen_tokens": "chosen_tokens"},
        options=lambda config, step: {
            "beta": config.objective.beta or 0.1,
            "nll_weight": config.objective.cpo_alpha,
            "label_smoothing": config.objective.cpo_label_smoothing,
        },
        gradient="pair",
        metric_counts=PAIR_METRIC_COUNTS,
    )
)

"""GMPO, Geometric-Mean Policy Optimization (docs/objectives.md, "GMPO"): per sequence, the geometric mean of the
token importance ratios, each clipped in log space, so that one outlier token cannot dominate the sequence's
update."""

from __future__ import annotations

import torch

from ..checks import check_non_negative
from ..engine.head import HeadSpec
from ..reduction import check_num_items, divide_by_count, mean_count
from .policy_gradient import LOG_RATIO_LIMIT, k3_kl
from .registry import Objective, clip_options, register
from .tokens import LossOutput, TokenBatch, TokenLayout, evaluate_objective, objective_module


def check_gmpo_options(*, epsilon_low: float, epsilon_high: float) -> None:
    check_non_negative("epsilon_low", epsilon_low)
    check_non_negative("epsilon_high", epsilon_high)


def gmpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    epsilon_low: float = 0.4,
    epsilon_high: float = 0.4,
    num_items: int | torch.Tensor | None = None,
    head: HeadSpec | None = None,
    **head_options,
) -> LossOutput:
    """``L = -mean_i A_i * exp(mean_t log m_t)`` over the sequences with loss tokens (or ``num_items`` sequences),
    with ``lr_t = logp_t - old_logp_t`` and, in log space, ``log m_t = min(lr_t, clip(lr_t, -epsilon_low,
    epsilon_high))`` when ``A_i > 0``, ``max(...)`` when ``A_i < 0`` (the paper's clip range (e^-0.4, e^0.4) by
    default). The exp of a sequence mean: not token-separable.

    ``advantages`` are per sequence (``[num_sequences]``); ``old_logp`` per token (None: on-policy, ratio 1).
    Metrics: ``clip_frac`` (tokens whose log-ratio was clipped), ``mean_ratio`` (mean over sequences of the
    geometric-mean ratio), ``approx_kl``, ``entropy``.
    """
    check_gmpo_options(epsilon_low=epsilon_low, epsilon_high=epsilon_high)
    check_num_items(num_items)
    if advantages is None:
        raise ValueError("advantages is required (one per sequence)")

    def loss_of_batch(batch: TokenBatch) -> LossOutput:
        batch.require_sequences("gmpo_loss")
        seq_advantages = batch.per_sequence(advantages, "advantages").to(batch.logp.dtype)
        old_token_logp = (
            batch.logp.detach() if old_logp is None else batch.per_token(old_logp, "old_logp", per_sequence=False)
        )
        log_ratio = (batch.logp - old_token_logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)  # 0 outside the loss
        clipped = log_ratio.clamp(-epsilon_low, epsilon_high)
        positive = batch.to_tokens(seq_advantages) > 0
        log_m = torch.where(positive, torch.minimum(log_ratio, clipped), torch.maximum(log_ratio, clipped))
        seq_tokens = batch.seq_tokens()
        has_tokens = seq_tokens > 0
        geometric_ratio = torch.exp(batch.seq_sum(log_m) / seq_tokens.clamp(min=1))
        objective = torch.where(has_tokens, seq_advantages * geometric_ratio, 0.0)
        loss = -divide_by_count(objective.sum(), mean_count(has_tokens.sum(), num_items))
        metrics = {
            "clip_frac": batch.token_mean(log_m.detach() != log_ratio.detach()),
            "mean_ratio": divide_by_count(
                torch.where(has_tokens, geometric_ratio.detach(), 0.0).sum(), has_tokens.sum()
            ),
            "approx_kl": batch.token_mean(k3_kl(batch.logp.detach(), old_token_logp)),
            "entropy": batch.token_mean(batch.entropy),
        }
        return LossOutput(loss, metrics)

    head = HeadSpec.resolve(head, head_options)
    layout = TokenLayout.read(
        targets, head, loss_mask=loss_mask, sequence_ids=sequence_ids, num_sequences=num_sequences
    )
    layout.check_inputs(per_token={"old_logp": old_logp}, per_sequence={"advantages": advantages})
    plan = GMPO.gradient_plan()
    return evaluate_objective(
        loss_of_batch, hidden, weight, bias, layout, head=head, plan=plan, inputs=(advantages, old_logp)
    )


GMPOLoss = objective_module("GMPOLoss", gmpo_loss, check_gmpo_options)


# a sum over sequences of terms each depending on one sequence's tokens
GMPO = register(
    Objective(
        name="gmpo",
        loss=gmpo_loss,
        data="rollouts",
        normalisers={"num_items": "sequences"},
        batch_inputs=("advantages", "old_logp"),
        options=lambda config, step: clip_options(config),
        gradient="sequence",
        metric_counts={"clip_frac": "tokens", "mean_ratio": "sequences", "approx_kl": "tokens", "entropy": "tokens"},
    )
)

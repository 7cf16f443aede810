"""CISPO, from MiniMax-M1 (docs/objectives.md, "CISPO"): the clipped importance weight as a stop-gradient
coefficient on logp, so that every token keeps its gradient (no token is clipped out of the update, only its
weight is bounded)."""

from __future__ import annotations

import torch

from ..checks import check_non_negative
from ..engine.head import HeadSpec
from .policy_gradient import (
    POLICY_GRADIENT_DECLARATION,
    importance_ratio,
    k3_kl,
    log_importance_ratio,
    policy_metrics,
    truncated_weight_loss,
)
from .registry import Objective, register
from .tokens import (
    LossOutput,
    TokenBatch,
    TokenLayout,
    aggregate,
    check_aggregation,
    evaluate_objective,
    objective_module,
)


def check_cispo_options(
    *, epsilon_low: float, epsilon_high: float, beta: float, aggregation: str, max_response_length: int | None
) -> None:
    check_non_negative("epsilon_low", epsilon_low)
    check_non_negative("epsilon_high", epsilon_high)
    if epsilon_low > 1:
        raise ValueError(f"epsilon_low must be <= 1 (the weight's lower bound 1 - epsilon_low >= 0), got {epsilon_low}")
    check_non_negative("beta", beta)
    check_aggregation(aggregation)


def cispo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    epsilon_low: float = 1.0,
    epsilon_high: float = 0.28,
    beta: float = 0.0,
    aggregation: str = "token-mean",
    num_items: int | torch.Tensor | None = None,
    max_response_length: int | None = None,
    head: HeadSpec | None = None,
    **head_options,
) -> LossOutput:
    """Per token ``l_t = -sg(clip(r_t, 1 - epsilon_low, 1 + epsilon_high)) * A_t * logp_t`` (``+ beta * k3`` to a
    reference), ``r_t = exp(logp_t - old_logp_t)``, aggregated by ``aggregation`` (token-mean, as the paper, by
    default). ``dl_t/dlogp_t = -clip(r_t) * A_t``: token-separable. The defaults follow the paper: no effective
    lower bound on the weight (``epsilon_low = 1``), ``epsilon_high`` tuned (0.28 here).

    Inputs as :func:`grpo_loss` (advantages per token or per sequence; ``old_logp`` None means on-policy).
    Metrics: ``policy_loss``, ``clip_frac_low``, ``clip_frac_high`` (tokens whose weight was clipped),
    ``mean_ratio``, ``approx_kl``, ``entropy``, and ``ref_kl`` when ``beta > 0``.
    """
    check_cispo_options(
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        beta=beta,
        aggregation=aggregation,
        max_response_length=max_response_length,
    )
    if advantages is None:
        raise ValueError("advantages is required (per token or per sequence)")
    if beta > 0 and ref_logp is None:
        raise ValueError("ref_logp is required when beta > 0 (the KL term needs the reference log-probs)")

    def loss_of_batch(batch: TokenBatch) -> LossOutput:
        token_advantages = batch.per_token(advantages, "advantages")
        old_token_logp = None if old_logp is None else batch.per_token(old_logp, "old_logp", per_sequence=False)
        ratio = importance_ratio(log_importance_ratio(batch, old_token_logp, "token"))
        policy_loss, clipped = truncated_weight_loss(
            ratio, token_advantages, batch.logp, 1.0 - epsilon_low, 1.0 + epsilon_high
        )
        per_token = policy_loss
        metrics = policy_metrics(batch, clipped)
        if beta > 0:
            kl = k3_kl(batch.logp, batch.per_token(ref_logp, "ref_logp", per_sequence=False))
            per_token = per_token + beta * kl
            metrics["ref_kl"] = batch.token_mean(kl)

        def reduce(values):
            return aggregate(values, batch, aggregation, num_items=num_items, max_response_length=max_response_length)

        metrics["policy_loss"] = reduce(policy_loss.detach())
        return LossOutput(reduce(per_token), metrics)

    head = HeadSpec.resolve(head, head_options)
    layout = TokenLayout.read(
        targets, head, loss_mask=loss_mask, sequence_ids=sequence_ids, num_sequences=num_sequences
    )
    layout.check_inputs(
        per_token={"old_logp": old_logp, "ref_logp": ref_logp}, per_token_or_sequence={"advantages": advantages}
    )
    plan = CISPO.gradient_plan()
    return evaluate_objective(
        loss_of_batch, hidden, weight, bias, layout, head=head, plan=plan, inputs=(advantages, old_logp, ref_logp)
    )


CISPOLoss = objective_module("CISPOLoss", cispo_loss, check_cispo_options)


CISPO = register(Objective(name="cispo", loss=cispo_loss, **POLICY_GRADIENT_DECLARATION))

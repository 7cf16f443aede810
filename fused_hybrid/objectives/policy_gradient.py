"""PPO / GRPO / GSPO clipped surrogate with an optional k3 KL term and entropy bonus
(docs/objectives.md, "Clipped surrogate")."""

from __future__ import annotations

import torch

from ..checks import check_non_negative
from ..engine.head import HeadSpec
from .registry import Objective, aggregation_count, needs_kl_reference, policy_gradient_options, register
from .tokens import (
    LossOutput,
    TokenBatch,
    TokenLayout,
    aggregate,
    check_aggregation,
    evaluate_objective,
    objective_module,
)

LOG_RATIO_LIMIT = 20.0  # log-ratios are clamped to +-20 before exp (as verl does)
KL_LIMIT = 10.0  # the k3 estimate is clamped to +-10
IMPORTANCE_SAMPLING = ("token", "sequence")
# policy_metrics' keys: means over the batch's loss tokens
POLICY_METRICS = ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "mean_ratio", "approx_kl", "entropy")


def check_clip_options(epsilon_low: float, epsilon_high: float, dual_clip: float | None) -> None:
    check_non_negative("epsilon_low", epsilon_low)
    check_non_negative("epsilon_high", epsilon_high)
    if epsilon_low >= 1:
        raise ValueError(f"epsilon_low must be < 1 (the ratio's lower bound is 1 - epsilon_low), got {epsilon_low}")
    if dual_clip is not None:
        check_non_negative("dual_clip", dual_clip)
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (or None to turn it off), got {dual_clip}")


def log_importance_ratio(batch: TokenBatch, old_logp: torch.Tensor | None, importance_sampling: str) -> torch.Tensor:
    """Per-token log-ratio log(pi / pi_old) from per-token `old_logp` [N]; with None the rollout policy is the
    current one (ratio 1, gradient of logp).

    Sequence-level (GSPO): every token of sequence i carries the value log s_i = mean_t (logp_t - old_logp_t) and
    the gradient of its own logp_t ("GSPO-token" form); with sequence-level advantages and the seq-mean-token-mean
    aggregation this is exactly the gradient of -mean_i min(s_i A_i, clip(s_i) A_i).
    """
    if importance_sampling not in IMPORTANCE_SAMPLING:
        raise ValueError(f"importance_sampling must be one of {IMPORTANCE_SAMPLING}, got {importance_sampling!r}")
    log_ratio = batch.logp - (batch.logp.detach() if old_logp is None else old_logp)
    if importance_sampling == "token":
        return log_ratio
    batch.require_sequences("importance_sampling='sequence'")
    seq_log_ratio = batch.seq_sum(log_ratio.detach()) / batch.seq_tokens().clamp(min=1)
    return batch.logp - batch.logp.detach() + batch.to_tokens(seq_log_ratio)


def clipped_surrogate(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO loss -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), dual-clipped at -c A when A < 0.

    Returns the per-token loss and boolean masks of where each clip is active (for the metrics).
    """
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    active = {
        "ratio": ratio.detach(),
        "clip_low": (ratio < 1.0 - epsilon_low) & (advantages < 0),
        "clip_high": (ratio > 1.0 + epsilon_high) & (advantages > 0),
    }
    if dual_clip is not None:
        dual_bound = -dual_clip * advantages
        active["dual_clip"] = (advantages < 0) & (loss > dual_bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, dual_bound), loss)
    return loss, active


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = ref_logp - logp, d and the result clamped."""
    delta = (ref_logp - logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return (torch.exp(delta) - delta - 1.0).clamp(-KL_LIMIT, KL_LIMIT)


def policy_metrics(batch: TokenBatch, active: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    metrics = {
        "clip_frac_low": batch.token_mean(active["clip_low"]),
        "clip_frac_high": batch.token_mean(active["clip_high"]),
        "mean_ratio": batch.token_mean(active["ratio"]),
        "approx_kl": batch.token_mean(k3_kl(batch.logp.detach(), batch.logp.detach() - active["ratio"].log())),
        "entropy": batch.token_mean(batch.entropy),
    }
    if "dual_clip" in active:
        metrics["dual_clip_frac"] = batch.token_mean(active["dual_clip"])
    return metrics


def check_grpo_options(
    *,
    epsilon_low: float,
    epsilon_high: float,
    dual_clip: float | None,
    beta: float,
    entropy_coef: float,
    importance_sampling: str,
    aggregation: str,
    max_response_length: int | None,
) -> None:
    check_clip_options(epsilon_low, epsilon_high, dual_clip)
    check_non_negative("beta", beta)
    check_non_negative("entropy_coef", entropy_coef)
    check_aggregation(aggregation)
    if importance_sampling not in IMPORTANCE_SAMPLING:
        raise ValueError(f"importance_sampling must be one of {IMPORTANCE_SAMPLING}, got {importance_sampling!r}")


def grpo_loss(
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
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    dual_clip: float | None = 3.0,
    beta: float = 0.0,
    entropy_coef: float = 0.0,
    importance_sampling: str = "token",
    aggregation: str = "token-mean",
    num_items: int | torch.Tensor | None = None,
    max_response_length: int | None = None,
    head: HeadSpec | None = None,
    **head_options,
) -> LossOutput:
    """PPO / GRPO / GSPO policy loss on the LM head, without the logits.

    Per token: ``l_t = -min(r_t A_t, clip(r_t, 1 - epsilon_low, 1 + epsilon_high) A_t)`` (dual-clipped at
    ``-dual_clip * A_t`` when ``A_t < 0``) ``+ beta * k3(ref_logp, logp) - entropy_coef * H_t``, aggregated by
    ``aggregation`` (see :func:`aggregate`). ``r_t = exp(logp_t - old_logp_t)`` per token, or the GSPO sequence ratio
    ``exp(mean_t(logp_t - old_logp_t))`` with ``importance_sampling="sequence"``.

    Args:
        advantages: per token (shape of ``targets``) or per sequence (``[num_sequences]``).
        old_logp: log-probs of the rollout policy (per token); ``None`` means on-policy (ratio 1).
        ref_logp: reference-policy log-probs (per token); required when ``beta > 0``.
        loss_mask: 0/1 per token (response tokens); tokens whose target is ``ignore_index`` are excluded too.
        num_items: global count for the aggregation (tokens for token-mean, sequences otherwise).
        max_response_length: the Dr. GRPO constant of ``seq-mean-token-sum-norm`` (default: the padded length T).

    Metrics: ``policy_loss``, ``clip_frac_low``, ``clip_frac_high``, ``dual_clip_frac``, ``mean_ratio``,
    ``approx_kl`` (k3 of the rollout policy vs the current one), ``entropy``, and ``ref_kl`` when ``beta > 0``.
    """
    check_grpo_options(
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        dual_clip=dual_clip,
        beta=beta,
        entropy_coef=entropy_coef,
        importance_sampling=importance_sampling,
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
        log_ratio = log_importance_ratio(batch, old_token_logp, importance_sampling)
        policy_loss, active = clipped_surrogate(
            log_ratio, token_advantages, epsilon_low=epsilon_low, epsilon_high=epsilon_high, dual_clip=dual_clip
        )
        per_token = policy_loss
        metrics = policy_metrics(batch, active)
        if beta > 0:
            kl = k3_kl(batch.logp, batch.per_token(ref_logp, "ref_logp", per_sequence=False))
            per_token = per_token + beta * kl
            metrics["ref_kl"] = batch.token_mean(kl)
        if entropy_coef > 0:
            per_token = per_token - entropy_coef * batch.entropy

        def reduce(values):
            return aggregate(values, batch, aggregation, num_items=num_items, max_response_length=max_response_length)

        metrics["policy_loss"] = reduce(policy_loss.detach())
        return LossOutput(reduce(per_token), metrics)

    head = HeadSpec.resolve(head, head_options)
    layout = TokenLayout.read(
        targets, head, loss_mask=loss_mask, sequence_ids=sequence_ids, num_sequences=num_sequences
    )
    plan = GRPO.gradient_plan(importance_sampling=importance_sampling)
    return evaluate_objective(
        loss_of_batch, hidden, weight, bias, layout, head=head, plan=plan, inputs=(advantages, old_logp, ref_logp)
    )


GRPOLoss = objective_module("GRPOLoss", grpo_loss, check_grpo_options)


def _grpo_gradient(*, importance_sampling: str) -> str:
    """Token ratios: token-separable; GSPO's sequence ratio: separable over whole sequences."""
    return "token" if importance_sampling == "token" else "sequence"


# What every clipped policy-gradient objective on rollouts declares (GRPO here, CISPO beside it).
POLICY_GRADIENT_DECLARATION = dict(
    data="rollouts",
    normalisers={"num_items": aggregation_count},
    batch_inputs=("advantages", "old_logp", "ref_logp"),
    options=policy_gradient_options,
    needs_reference=needs_kl_reference,
    metric_counts={"policy_loss": "sum", "ref_kl": "tokens", **dict.fromkeys(POLICY_METRICS, "tokens")},
)
GRPO = register(Objective(name="grpo", loss=grpo_loss, gradient=_grpo_gradient, **POLICY_GRADIENT_DECLARATION))

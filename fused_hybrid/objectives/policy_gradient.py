"""The GRPO family of policy losses: PPO / GRPO / GSPO / DAPO / Dr. GRPO clipped surrogates, CISPO's truncated
weight, SAPO's soft gate, LUSPO's length-scaled sequence loss and VESPO's Gamma weight, with TRL's sampler
correction, off-policy sequence masking, bias-corrected KL and high-entropy token selection
(docs/objectives.md, "Policy gradient")."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from ..checks import check_non_negative, check_positive
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

LOG_RATIO_LIMIT = 20.0  # log-ratios are clamped to +-20 before exp (as verl and TRL do)
KL_LIMIT = 10.0  # the k3 estimate is clamped to +-10
IMPORTANCE_SAMPLING = ("token", "sequence")
# TRL's loss types (docs/objectives.md, "Loss types") and the aggregation each one normalises by.
LOSS_TYPE_AGGREGATIONS = {
    "dapo": "token-mean",
    "bnpo": "token-mean",
    "grpo": "seq-mean-token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "cispo": "token-mean",
    "sapo": "seq-mean-token-mean",
    "luspo": "seq-mean-token-sum",
    "vespo": "token-mean",
}
LOSS_TYPES = tuple(LOSS_TYPE_AGGREGATIONS)
CLIPPED_LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo", "luspo")  # the PPO clipped surrogate
DEFAULT_EPSILON_LOW = DEFAULT_EPSILON_HIGH = 0.2
DEFAULT_CISPO_CAP = 5.0  # cispo's epsilon_high is the weight's cap itself (ScaleRL's recommended value)
# TRL's vllm_importance_sampling_mode: the sampler ratio per token or per sequence, truncated or masked.
SAMPLER_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
VESPO_LOG_WEIGHT_FLOOR = math.log(1e-8)
# policy_metrics' keys: means over the batch's loss tokens
POLICY_METRICS = ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "mean_ratio", "approx_kl", "entropy")
# the other options' metrics, present when the option is on: means over the batch's loss tokens
OPTION_METRICS = ("sampler_ratio", "off_policy_masked", "entropy_kept", "vespo_weight")


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

    Sequence-level (GSPO): every token of sequence i carries log s_i = mean_t (logp_t - old_logp_t), differentiated
    through all of the sequence's tokens (as TRL does), so a chunk of the engine must hold whole sequences.
    """
    if importance_sampling not in IMPORTANCE_SAMPLING:
        raise ValueError(f"importance_sampling must be one of {IMPORTANCE_SAMPLING}, got {importance_sampling!r}")
    log_ratio = batch.logp - (batch.logp.detach() if old_logp is None else old_logp)
    if importance_sampling == "token":
        return log_ratio
    batch.require_sequences("importance_sampling='sequence'")
    return batch.to_tokens(batch.seq_sum(log_ratio) / batch.seq_tokens().clamp(min=1))


def importance_ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))


def clipped_surrogate(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    dual_clip: float | None,
    delta: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO loss -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), the unclipped branch taking min(r, delta)
    when `delta` is set (two-sided clip), dual-clipped at -c A when A < 0.

    Returns the per-token loss and boolean masks of where each clip is active (for the metrics).
    """
    ratio = importance_ratio(log_ratio)
    unclipped = (ratio if delta is None else ratio.clamp(max=delta)) * advantages
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


def truncated_weight_loss(
    ratio: torch.Tensor, advantages: torch.Tensor, logp: torch.Tensor, lower: float | None, upper: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO's per-token loss -sg(clip(r, lower, upper)) A logp: the clipped ratio is a detached weight, so every
    token keeps its gradient. Returns the loss and where the weight was clipped, whatever the advantage's sign."""
    ratio = ratio.detach()
    loss = -ratio.clamp(lower, upper) * advantages * logp
    clip_low = ratio < lower if lower is not None else torch.zeros_like(ratio, dtype=torch.bool)
    return loss, {"ratio": ratio, "clip_low": clip_low, "clip_high": ratio > upper}


def soft_gate_loss(
    ratio: torch.Tensor, advantages: torch.Tensor, temperature_pos: float, temperature_neg: float
) -> torch.Tensor:
    """SAPO's per-token loss -f(r) A with f(r) = 4 sigmoid(tau (r - 1)) / tau (f(1) = 2 / tau, f'(1) = 1), tau the
    positive advantages' temperature where A > 0, the others' elsewhere."""
    tau = torch.where(advantages > 0, temperature_pos, temperature_neg).to(ratio.dtype)
    return -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * advantages


def gamma_weight(
    batch: TokenBatch,
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    log_sampler_ratio: torch.Tensor | None,
    *,
    k_pos: float,
    lambda_pos: float,
    k_neg: float,
    lambda_neg: float,
) -> torch.Tensor:
    """VESPO's detached weight phi(w) = exp(lambda + k log w - lambda w) per token (phi(1) = 1) of its sequence's
    importance weight log w = clamp(sum_t clamp(lr_t, +-20) [+ sum_t log c_t], log 1e-8, 20), c_t the sampler
    correction; k / lambda are the non-negative advantages' where A_t >= 0, the others' elsewhere."""
    log_ratio = log_ratio.detach().clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    if log_sampler_ratio is not None:
        log_ratio = log_ratio + log_sampler_ratio
    seq_log_weight = batch.seq_sum(log_ratio).clamp(VESPO_LOG_WEIGHT_FLOOR, LOG_RATIO_LIMIT)
    log_weight = batch.to_tokens(seq_log_weight)
    non_negative = advantages >= 0
    k = torch.where(non_negative, k_pos, k_neg).to(log_weight.dtype)
    lam = torch.where(non_negative, lambda_pos, lambda_neg).to(log_weight.dtype)
    phi = torch.exp(lam + k * log_weight - lam * log_weight.exp())
    return torch.where(phi.isfinite(), phi, 0.0)


def sampler_ratio(
    batch: TokenBatch,
    old_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mode: str,
    clip_min: float | None,
    clip_max: float | None,
) -> torch.Tensor:
    """The trainer/sampler mismatch weight per token [N] (detached): exp(old_logp - sampler_logp) per token, or its
    product over the sequence (`sequence_*` modes), truncated to [clip_min, clip_max] (`*_truncate`) or 0 outside
    it (`*_mask`). A NaN sampler log-prob is a token the rollout engine did not score: it counts as no mismatch."""
    difference = old_logp.detach() - sampler_logp
    difference = batch.keep(torch.where(difference.isnan(), 0.0, difference))
    if mode.startswith("sequence"):
        difference = batch.to_tokens(batch.seq_sum(difference))
    ratio = torch.exp(difference)
    if mode.endswith("truncate"):
        return ratio.clamp(clip_min, clip_max)
    outside = torch.zeros_like(ratio, dtype=torch.bool)
    if clip_min is not None:
        outside = outside | (ratio < clip_min)
    if clip_max is not None:
        outside = outside | (ratio > clip_max)
    return torch.where(outside, 0.0, ratio)


def off_policy_keep(
    batch: TokenBatch, sampling_logp: torch.Tensor, advantages: torch.Tensor, threshold: float
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask per token [N] (bool): a token is dropped when its advantage is
    negative and its sequence's mean sg(sampling_logp - logp) over its loss tokens exceeds `threshold` (a NaN
    sampling log-prob gives no evidence: 0)."""
    divergence = sampling_logp - batch.logp.detach()
    divergence = torch.where(divergence.isnan(), 0.0, divergence)
    mean_divergence = batch.seq_sum(divergence) / batch.seq_tokens().clamp(min=1)
    return (advantages >= 0) | batch.to_tokens(mean_divergence <= threshold)


def gather_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` [n] of every rank of the default process group, concatenated (just `values` outside one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    counts = [torch.zeros((), dtype=torch.int64, device=values.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor(values.numel(), dtype=torch.int64, device=values.device))
    longest = int(max(counts))
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([rank_values[: int(count)] for rank_values, count in zip(gathered, counts)])


def high_entropy_tokens(batch: TokenBatch, quantile: float) -> torch.Tensor:
    """The loss tokens [N] (bool) whose entropy is in the top `quantile` of the loss tokens' entropies, across the
    ranks of the default process group when one is initialised: H_t >= the (1 - quantile) quantile, with linear
    interpolation (torch.quantile)."""
    entropy = batch.entropy.detach()
    pooled = gather_across_ranks(entropy[batch.mask]).sort().values
    if pooled.numel() == 0:
        return torch.zeros_like(batch.mask)
    # torch.quantile's linear interpolation, without its limit on the number of values
    position = (1.0 - quantile) * (pooled.numel() - 1)
    below = math.floor(position)
    above = min(below + 1, pooled.numel() - 1)
    threshold = torch.lerp(pooled[below], pooled[above], position - below)
    return batch.mask & (entropy >= threshold)


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


@dataclasses.dataclass(frozen=True)
class PolicyOptions:
    """The options of a grpo_loss call, checked, with the loss type's defaults filled in."""

    loss_type: str
    epsilon_low: float
    epsilon_high: float
    dual_clip: float | None
    delta: float | None
    sapo_temperature_pos: float
    sapo_temperature_neg: float
    vespo_k_pos: float
    vespo_lambda_pos: float
    vespo_k_neg: float
    vespo_lambda_neg: float
    sampler_correction: str
    sampler_clip_min: float | None
    sampler_clip_max: float | None
    off_policy_mask_threshold: float | None
    use_bias_correction_kl: bool
    top_entropy_quantile: float
    beta: float
    entropy_coef: float
    importance_sampling: str
    aggregation: str
    max_response_length: int | None


def check_grpo_options(
    *,
    loss_type: str,
    epsilon_low: float | None,
    epsilon_high: float | None,
    epsilon: float | None = None,
    importance_sampling_level: str | None = None,
    dual_clip: float | None,
    delta: float | None,
    sapo_temperature_pos: float,
    sapo_temperature_neg: float,
    vespo_k_pos: float,
    vespo_lambda_pos: float,
    vespo_k_neg: float,
    vespo_lambda_neg: float,
    sampler_correction: str,
    sampler_clip_min: float | None,
    sampler_clip_max: float | None,
    off_policy_mask_threshold: float | None,
    use_bias_correction_kl: bool,
    top_entropy_quantile: float,
    beta: float,
    entropy_coef: float,
    importance_sampling: str | None,
    aggregation: str | None,
    max_response_length: int | None,
) -> PolicyOptions:
    """Check every option of :func:`grpo_loss`, naming the one at fault; returns them with the defaults resolved.
    TRL's GRPOConfig names are accepted for the same settings: ``epsilon`` (the lower clip and, unless
    ``epsilon_high`` is given, the upper one, as TRL's) and ``importance_sampling_level``."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    aliases = (
        ("epsilon_low", epsilon_low, "epsilon", epsilon),
        ("importance_sampling", importance_sampling, "importance_sampling_level", importance_sampling_level),
    )
    for ours, our_value, trls, trl_value in aliases:
        if our_value is not None and trl_value is not None:
            raise ValueError(f"give {ours} or {trls} (TRL's name for it), not both")
    if epsilon_low is None:
        epsilon_low = DEFAULT_EPSILON_LOW if epsilon is None else epsilon
    if importance_sampling is None:
        importance_sampling = importance_sampling_level
    if epsilon_high is None:
        if loss_type == "cispo":
            epsilon_high = DEFAULT_CISPO_CAP
        else:
            epsilon_high = DEFAULT_EPSILON_HIGH if epsilon is None else epsilon
    if loss_type == "cispo":
        check_positive("epsilon_high", epsilon_high)
        if epsilon_high <= 1:
            raise ValueError(
                f"with loss_type='cispo', epsilon_high is the weight's cap itself (TRL's epsilon_max, e.g. 5.0), "
                f"so it must be > 1; got {epsilon_high}, which would cap even the on-policy weight 1 "
                f"(for a cap at 1 + {epsilon_high}, pass epsilon_high={1 + epsilon_high})"
            )
        check_non_negative("epsilon_low", epsilon_low)
    else:
        check_clip_options(epsilon_low, epsilon_high, dual_clip)
    if delta is not None:
        check_positive("delta", delta)
        if delta <= 1:
            raise ValueError(f"delta (the two-sided clip's cap on the ratio) must be > 1 or None, got {delta}")
    check_positive("sapo_temperature_pos", sapo_temperature_pos)
    check_positive("sapo_temperature_neg", sapo_temperature_neg)
    check_non_negative("vespo_k_pos", vespo_k_pos)
    check_non_negative("vespo_k_neg", vespo_k_neg)
    check_positive("vespo_lambda_pos", vespo_lambda_pos)
    check_positive("vespo_lambda_neg", vespo_lambda_neg)
    if sampler_correction not in SAMPLER_CORRECTIONS:
        raise ValueError(f"sampler_correction must be one of {SAMPLER_CORRECTIONS}, got {sampler_correction!r}")
    if loss_type == "vespo" and not sampler_correction.startswith("token"):
        raise ValueError(
            f"loss_type='vespo' folds the sampler correction into its sequence weight token by token: "
            f"sampler_correction must be 'token_truncate' or 'token_mask', got {sampler_correction!r}"
        )
    for name, bound in (("sampler_clip_min", sampler_clip_min), ("sampler_clip_max", sampler_clip_max)):
        if bound is not None:
            check_non_negative(name, bound)
    if sampler_clip_min is not None and sampler_clip_max is not None and sampler_clip_min > sampler_clip_max:
        raise ValueError(f"sampler_clip_min ({sampler_clip_min}) must be <= sampler_clip_max ({sampler_clip_max})")
    if off_policy_mask_threshold is not None:
        check_non_negative("off_policy_mask_threshold", off_policy_mask_threshold)
    if not isinstance(use_bias_correction_kl, bool):
        raise TypeError(f"use_bias_correction_kl must be a bool, got {type(use_bias_correction_kl).__name__}")
    check_non_negative("top_entropy_quantile", top_entropy_quantile)
    if top_entropy_quantile > 1:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {top_entropy_quantile}")
    check_non_negative("beta", beta)
    check_non_negative("entropy_coef", entropy_coef)
    if importance_sampling is None:
        importance_sampling = "sequence" if loss_type == "luspo" else "token"
    if importance_sampling not in IMPORTANCE_SAMPLING:
        raise ValueError(f"importance_sampling must be one of {IMPORTANCE_SAMPLING}, got {importance_sampling!r}")
    if loss_type == "vespo" and importance_sampling != "token":
        raise ValueError("loss_type='vespo' weights each sequence itself: importance_sampling must be 'token'")
    aggregation = LOSS_TYPE_AGGREGATIONS[loss_type] if aggregation is None else aggregation
    check_aggregation(aggregation)
    if max_response_length is not None:
        check_non_negative("max_response_length", max_response_length)
    return PolicyOptions(
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        dual_clip=dual_clip,
        delta=delta,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
        vespo_k_pos=vespo_k_pos,
        vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg,
        sampler_correction=sampler_correction,
        sampler_clip_min=sampler_clip_min,
        sampler_clip_max=sampler_clip_max,
        off_policy_mask_threshold=off_policy_mask_threshold,
        use_bias_correction_kl=use_bias_correction_kl,
        top_entropy_quantile=top_entropy_quantile,
        beta=beta,
        entropy_coef=entropy_coef,
        importance_sampling=importance_sampling,
        aggregation=aggregation,
        max_response_length=max_response_length,
    )


def policy_token_loss(
    batch: TokenBatch, options: PolicyOptions, log_ratio: torch.Tensor, advantages: torch.Tensor, sampler_weight
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The loss type's per-token policy loss [N], its clip masks (policy_metrics) and its own metrics."""
    loss_type = options.loss_type
    if loss_type in CLIPPED_LOSS_TYPES:
        loss, active = clipped_surrogate(
            log_ratio,
            advantages,
            epsilon_low=options.epsilon_low,
            epsilon_high=options.epsilon_high,
            dual_clip=options.dual_clip,
            delta=options.delta,
        )
        return loss, active, {}
    ratio = importance_ratio(log_ratio)
    if loss_type == "cispo":
        loss, active = truncated_weight_loss(ratio, advantages, batch.logp, None, options.epsilon_high)
        return loss, active, {}
    no_clip = torch.zeros_like(batch.mask)
    active = {"ratio": ratio.detach(), "clip_low": no_clip, "clip_high": no_clip}
    if loss_type == "sapo":
        return soft_gate_loss(ratio, advantages, options.sapo_temperature_pos, options.sapo_temperature_neg), active, {}
    log_sampler_ratio = None
    if sampler_weight is not None:  # folded into the sequence weight, log c_t clamped as the weight is
        log_sampler_ratio = sampler_weight.log().clamp(VESPO_LOG_WEIGHT_FLOOR, LOG_RATIO_LIMIT)
    phi = gamma_weight(
        batch,
        log_ratio,
        advantages,
        log_sampler_ratio,
        k_pos=options.vespo_k_pos,
        lambda_pos=options.vespo_lambda_pos,
        k_neg=options.vespo_k_neg,
        lambda_neg=options.vespo_lambda_neg,
    )
    return -phi * advantages * batch.logp, active, {"vespo_weight": batch.token_mean(phi)}


def grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    sampler_logp: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    loss_type: str = "dapo",
    epsilon_low: float | None = None,
    epsilon_high: float | None = None,
    epsilon: float | None = None,
    importance_sampling_level: str | None = None,
    dual_clip: float | None = 3.0,
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    sampler_correction: str = "token_truncate",
    sampler_clip_min: float | None = None,
    sampler_clip_max: float | None = 3.0,
    off_policy_mask_threshold: float | None = None,
    use_bias_correction_kl: bool = False,
    top_entropy_quantile: float = 1.0,
    beta: float = 0.0,
    entropy_coef: float = 0.0,
    importance_sampling: str | None = None,
    aggregation: str | None = None,
    num_items: int | torch.Tensor | None = None,
    max_response_length: int | None = None,
    head: HeadSpec | None = None,
    **head_options,
) -> LossOutput:
    """The GRPO family of policy losses on the LM head, without the logits (docs/objectives.md, "Policy gradient").

    ``loss_type`` takes TRL's names and normalisations: the PPO clipped surrogate
    ``-min(r_t A_t, clip(r_t, 1 - epsilon_low, 1 + epsilon_high) A_t)`` aggregated as ``"dapo"`` / ``"bnpo"``
    (token mean), ``"grpo"`` (per sequence, then over sequences), ``"dr_grpo"`` (by sequences x
    ``max_response_length``) or ``"luspo"`` (summed per sequence, then over sequences; the sequence ratio by
    default); ``"cispo"`` (``-sg(min(r_t, epsilon_high)) A_t logp_t``, token mean: ``epsilon_high`` is the cap
    itself, 5.0 by default); ``"sapo"`` (``-4 sigmoid(tau (r_t - 1)) / tau * A_t``, per sequence then over
    sequences); ``"vespo"`` (``-sg(phi(w_i)) A_t logp_t``, token mean). ``aggregation`` overrides the loss type's
    normalisation (``"token-mean"``, ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"``,
    ``"seq-mean-token-sum-norm"``). ``r_t = exp(logp_t - old_logp_t)`` per token, or GSPO's sequence ratio
    ``exp(mean_t(logp_t - old_logp_t))`` with ``importance_sampling="sequence"``. Each token then adds
    ``beta * k3(ref_logp, logp)`` (times the ratio with ``use_bias_correction_kl``) and ``-entropy_coef * H_t``.

    Args:
        advantages: per token (shape of ``targets``) or per sequence (``[num_sequences]``).
        old_logp: log-probs of the rollout policy (per token); ``None`` means on-policy (ratio 1).
        ref_logp: reference-policy log-probs (per token); required when ``beta > 0``.
        sampler_logp: the log-probs the rollout engine reported (per token; NaN: not scored, no correction). Each
            token's policy loss is multiplied by ``exp(old_logp - sampler_logp)`` (per token, or its product over
            the sequence), truncated to ``[sampler_clip_min, sampler_clip_max]`` or 0 outside it, by
            ``sampler_correction`` (TRL's ``vllm_importance_sampling_mode``); vespo folds it into its weight.
        loss_mask: 0/1 per token (response tokens); tokens whose target is ``ignore_index`` are excluded too.
        epsilon_low, epsilon_high: the clip range (default 0.2 both; cispo's epsilon_high 5.0). TRL's ``epsilon``
            sets the lower bound and, unless ``epsilon_high`` is given, the upper one.
        importance_sampling_level: TRL's name for ``importance_sampling`` (``"token"`` or GSPO's ``"sequence"``).
        dual_clip: the dual-clip bound of the clipped loss types (None: off).
        delta: the two-sided clip of the clipped loss types: the unclipped branch takes ``min(r_t, delta)``.
        off_policy_mask_threshold: drop the sequences with a negative advantage whose mean
            ``sampler_logp - logp`` (``old_logp`` without a sampler) exceeds it.
        top_entropy_quantile: only the loss tokens whose entropy is in this top fraction of the call's loss tokens
            (of every rank's, when a process group is initialised) carry the policy loss.
        num_items: global count for the aggregation (tokens for a token mean, sequences otherwise).
        max_response_length: the constant of ``dr_grpo`` (default: the padded length T).

    Metrics: ``policy_loss``, ``clip_frac_low``, ``clip_frac_high``, ``dual_clip_frac``, ``mean_ratio``,
    ``approx_kl`` (k3 of the rollout policy vs the current one), ``entropy``, and when their options are on
    ``ref_kl``, ``sampler_ratio``, ``off_policy_masked``, ``entropy_kept``, ``vespo_weight``.
    """
    options = check_grpo_options(
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        epsilon=epsilon,
        importance_sampling_level=importance_sampling_level,
        dual_clip=dual_clip,
        delta=delta,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
        vespo_k_pos=vespo_k_pos,
        vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg,
        sampler_correction=sampler_correction,
        sampler_clip_min=sampler_clip_min,
        sampler_clip_max=sampler_clip_max,
        off_policy_mask_threshold=off_policy_mask_threshold,
        use_bias_correction_kl=use_bias_correction_kl,
        top_entropy_quantile=top_entropy_quantile,
        beta=beta,
        entropy_coef=entropy_coef,
        importance_sampling=importance_sampling,
        aggregation=aggregation,
        max_response_length=max_response_length,
    )
    if advantages is None:
        raise ValueError("advantages is required (per token or per sequence)")
    if options.beta > 0 and ref_logp is None:
        raise ValueError("ref_logp is required when beta > 0 (the KL term needs the reference log-probs)")

    def loss_of_batch(batch: TokenBatch) -> LossOutput:
        token_advantages = batch.per_token(advantages, "advantages")
        old_token_logp = None if old_logp is None else batch.per_token(old_logp, "old_logp", per_sequence=False)
        behaviour_logp = batch.logp.detach() if old_token_logp is None else old_token_logp
        sampler_token_logp = None
        if sampler_logp is not None:
            sampler_token_logp = batch.per_token(sampler_logp, "sampler_logp", per_sequence=False)
        log_ratio = log_importance_ratio(batch, old_token_logp, options.importance_sampling)
        sampler_weight = None
        if sampler_token_logp is not None:
            sampler_weight = sampler_ratio(
                batch,
                behaviour_logp,
                sampler_token_logp,
                options.sampler_correction,
                options.sampler_clip_min,
                options.sampler_clip_max,
            )
        policy_loss, active, metrics = policy_token_loss(batch, options, log_ratio, token_advantages, sampler_weight)
        metrics.update(policy_metrics(batch, active))

        # TRL's order: the surrogate, times the off-policy and entropy masks, times the sampler weight
        if options.off_policy_mask_threshold is not None:
            batch.require_sequences("off_policy_mask_threshold")
            sampling_logp = behaviour_logp if sampler_token_logp is None else sampler_token_logp
            kept = off_policy_keep(batch, sampling_logp, token_advantages, options.off_policy_mask_threshold)
            policy_loss = torch.where(kept, policy_loss, 0.0)
            metrics["off_policy_masked"] = batch.token_mean(~kept)
        if options.top_entropy_quantile < 1:
            kept = high_entropy_tokens(batch, options.top_entropy_quantile)
            policy_loss = torch.where(kept, policy_loss, 0.0)
            metrics["entropy_kept"] = batch.token_mean(kept)
        if sampler_weight is not None:
            if options.loss_type != "vespo":
                policy_loss = policy_loss * sampler_weight
            metrics["sampler_ratio"] = batch.token_mean(sampler_weight)

        per_token = policy_loss
        if options.beta > 0:
            kl = k3_kl(batch.logp, batch.per_token(ref_logp, "ref_logp", per_sequence=False))
            metrics["ref_kl"] = batch.token_mean(kl)
            if options.use_bias_correction_kl:  # DeepSeek-V3.2: the KL of tokens drawn from the rollout policy
                kl = kl * importance_ratio(log_ratio)
            per_token = per_token + options.beta * kl
        if options.entropy_coef > 0:
            per_token = per_token - options.entropy_coef * batch.entropy

        def reduce(values):
            return aggregate(
                values,
                batch,
                options.aggregation,
                num_items=num_items,
                max_response_length=options.max_response_length,
            )

        metrics["policy_loss"] = reduce(policy_loss.detach())
        return LossOutput(reduce(per_token), metrics)

    head = HeadSpec.resolve(head, head_options)
    layout = TokenLayout.read(
        targets, head, loss_mask=loss_mask, sequence_ids=sequence_ids, num_sequences=num_sequences
    )
    layout.check_inputs(
        per_token={"old_logp": old_logp, "ref_logp": ref_logp, "sampler_logp": sampler_logp},
        per_token_or_sequence={"advantages": advantages},
    )
    plan = GRPO.gradient_plan(
        loss_type=options.loss_type,
        importance_sampling=options.importance_sampling,
        sequence_sampler_correction=sampler_logp is not None and options.sampler_correction.startswith("sequence"),
        off_policy_mask=options.off_policy_mask_threshold is not None,
        top_entropy_quantile=options.top_entropy_quantile,
    )
    return evaluate_objective(
        loss_of_batch,
        hidden,
        weight,
        bias,
        layout,
        head=head,
        plan=plan,
        inputs=(advantages, old_logp, ref_logp, sampler_logp),
    )


GRPOLoss = objective_module("GRPOLoss", grpo_loss, check_grpo_options)


def _grpo_gradient(
    *,
    importance_sampling: str,
    loss_type: str = "dapo",
    sequence_sampler_correction: bool = False,
    off_policy_mask: bool = False,
    top_entropy_quantile: float = 1.0,
) -> str:
    """Token ratios: token-separable. A sequence's ratio, weight, sampler correction or off-policy mask: separable
    over whole sequences. The entropy quantile couples every token of the batch: two passes."""
    if top_entropy_quantile < 1:
        return "two-pass"
    per_sequence = importance_sampling == "sequence" or loss_type == "vespo"
    return "sequence" if per_sequence or sequence_sampler_correction or off_policy_mask else "token"


# The trainer's config keys of grpo_loss's options beyond policy_gradient_options' (docs/objectives.md).
GRPO_CONFIG_KEYS = (
    "loss_type",
    "importance_sampling",
    "dual_clip",
    "delta",
    "sapo_temperature_pos",
    "sapo_temperature_neg",
    "vespo_k_pos",
    "vespo_lambda_pos",
    "vespo_k_neg",
    "vespo_lambda_neg",
    "off_policy_mask_threshold",
    "use_bias_correction_kl",
    "top_entropy_quantile",
)


def grpo_options(config, step: int) -> dict:
    objective = config.objective
    options = {**policy_gradient_options(config, step), **{key: getattr(objective, key) for key in GRPO_CONFIG_KEYS}}
    if objective.sampler_correction is not None:  # the trainer then records the sampler's log-probs
        options.update(
            sampler_correction=objective.sampler_correction,
            sampler_clip_min=objective.sampler_clip_min,
            sampler_clip_max=objective.sampler_clip_max,
        )
    return options


def grpo_aggregation_count(config) -> str:
    return aggregation_count(config, default=LOSS_TYPE_AGGREGATIONS[config.objective.loss_type])


# What every clipped policy-gradient objective on rollouts declares (GRPO here, CISPO beside it).
POLICY_GRADIENT_DECLARATION = dict(
    data="rollouts",
    normalisers={"num_items": aggregation_count},
    batch_inputs=("advantages", "old_logp", "ref_logp"),
    options=policy_gradient_options,
    needs_reference=needs_kl_reference,
    metric_counts={
        "policy_loss": "sum",
        "ref_kl": "tokens",
        **dict.fromkeys(POLICY_METRICS, "tokens"),
        **dict.fromkeys(OPTION_METRICS, "tokens"),
    },
)
GRPO = register(
    Objective(
        name="grpo",
        loss=grpo_loss,
        gradient=_grpo_gradient,
        **{
            **POLICY_GRADIENT_DECLARATION,
            "options": grpo_options,
            "check_options": check_grpo_options,
            "batch_inputs": (*POLICY_GRADIENT_DECLARATION["batch_inputs"], "sampler_logp"),
            "normalisers": {"num_items": grpo_aggregation_count},
        },
    )
)

"""Naive float64 implementations of every objective, written straight from docs/objectives.md.

Full logits, plain autograd, and explicit loops over sequences in the [B, T] layout, so that nothing is shared
with the package's vectorised code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tests.reference import logprobs_entropy64


def token_terms(hidden, weight, targets, loss_mask=None, **options):
    logp, entropy = logprobs_entropy64(hidden, weight, targets, **options)
    mask = targets != -100
    if loss_mask is not None:
        mask = mask & loss_mask.bool()
    return logp, entropy, mask


def dft(hidden, weight, targets, loss_mask=None, **options):
    logp, _, mask = token_terms(hidden, weight, targets, loss_mask, **options)
    return -(logp.detach().exp() * logp)[mask].sum() / max(int(mask.sum()), 1)


def ppo_token_loss(logp, old_logp, advantage, eps_low, eps_high, dual_clip):
    ratio = torch.exp(torch.clamp(logp - old_logp, -20, 20))
    loss = -torch.min(ratio * advantage, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantage)
    if dual_clip is not None and advantage < 0:
        loss = torch.min(loss, -dual_clip * advantage)
    return loss


def aggregate_loops(losses_per_seq, length):
    """losses_per_seq: list (one per sequence) of lists of token losses; returns the four aggregations."""
    kept = [seq for seq in losses_per_seq if len(seq) > 0]
    zero = torch.zeros((), dtype=torch.float64)
    if not kept:
        return dict.fromkeys(AGG, zero)
    all_tokens = [t for seq in kept for t in seq]
    return {
        "token-mean": sum(all_tokens) / len(all_tokens),
        "seq-mean-token-mean": sum(sum(seq) / len(seq) for seq in kept) / len(kept),
        "seq-mean-token-sum": sum(sum(seq) for seq in kept) / len(kept),
        "seq-mean-token-sum-norm": sum(all_tokens) / (len(kept) * length),
    }


AGG = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def grpo(
    hidden,
    weight,
    targets,
    *,
    advantages,
    old_logp=None,
    ref_logp=None,
    loss_mask=None,
    epsilon_low=0.2,
    epsilon_high=0.2,
    dual_clip=3.0,
    beta=0.0,
    entropy_coef=0.0,
    importance_sampling="token",
    aggregation="token-mean",
    **options,
):
    logp, entropy, mask = token_terms(hidden, weight, targets, loss_mask, **options)
    batch, length = targets.shape
    losses = []
    for i in range(batch):
        positions = [t for t in range(length) if mask[i, t]]
        if importance_sampling == "sequence" and positions:  # differentiated through every token of the sequence
            old = [old_logp[i, t] if old_logp is not None else logp[i, t].detach() for t in positions]
            seq_log_ratio = sum(logp[i, t] - o for t, o in zip(positions, old)) / len(positions)
        seq = []
        for t in positions:
            adv = advantages[i] if advantages.dim() == 1 else advantages[i, t]
            old = old_logp[i, t] if old_logp is not None else logp[i, t].detach()
            if importance_sampling == "sequence":
                loss = ppo_token_loss(seq_log_ratio, 0.0, adv, epsilon_low, epsilon_high, dual_clip)
            else:
                loss = ppo_token_loss(logp[i, t], old, adv, epsilon_low, epsilon_high, dual_clip)
            if beta > 0:
                delta = torch.clamp(ref_logp[i, t] - logp[i, t], -20, 20)
                loss = loss + beta * torch.clamp(torch.exp(delta) - delta - 1, -10, 10)
            loss = loss - entropy_coef * entropy[i, t]
            seq.append(loss)
        losses.append(seq)
    return aggregate_loops(losses, length)[aggregation]


def chord(
    hidden,
    weight,
    targets,
    *,
    is_expert,
    mu,
    advantages,
    old_logp=None,
    loss_mask=None,
    use_phi=False,
    cutoff_prob=1.0,
    epsilon_low=0.2,
    epsilon_high=0.2,
    dual_clip=3.0,
    **options,
):
    logp, _, mask = token_terms(hidden, weight, targets, loss_mask, **options)
    grpo_terms, sft_terms = [], []
    for i in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            if not mask[i, t]:
                continue
            if is_expert[i]:
                p = math.exp(min(logp[i, t].item(), math.log(cutoff_prob)))
                phi = p * (1 - p) if use_phi else 1.0
                sft_terms.append(-phi * logp[i, t])
            else:
                adv = advantages[i] if advantages.dim() == 1 else advantages[i, t]
                old = old_logp[i, t] if old_logp is not None else logp[i, t].detach()
                grpo_terms.append(ppo_token_loss(logp[i, t], old, adv, epsilon_low, epsilon_high, dual_clip))
    zero = torch.zeros((), dtype=torch.float64)
    grpo_part = sum(grpo_terms) / len(grpo_terms) if grpo_terms else zero
    sft_part = sum(sft_terms) / len(sft_terms) if sft_terms else zero
    return (1 - mu) * grpo_part + mu * sft_part


def sequence_sums(values, mask):
    return [(values[i][mask[i]]).sum() for i in range(values.shape[0])], [int(mask[i].sum()) for i in range(len(mask))]


def dpo(
    hidden,
    weight,
    targets,
    *,
    ref_logp=None,
    loss_type="sigmoid",
    beta=0.1,
    simpo_gamma=0.5,
    nll_weight=0.0,
    loss_mask=None,
    **options,
):
    logp, _, mask = token_terms(hidden, weight, targets, loss_mask, **options)
    sums, lengths = sequence_sums(logp, mask)
    lengths = [max(n, 1) for n in lengths]  # an empty response has log-prob 0 (and length-normalised 0)
    ref_sums = sequence_sums(ref_logp, mask)[0] if ref_logp is not None else None
    pairs = len(sums) // 2
    losses = []
    for i in range(pairs):
        chosen, rejected = i, pairs + i
        if loss_type == "sigmoid":
            h = beta * ((sums[chosen] - ref_sums[chosen]) - (sums[rejected] - ref_sums[rejected]))
            losses.append(-F.logsigmoid(h))
        elif loss_type == "ipo":
            h = (sums[chosen] - ref_sums[chosen]) / lengths[chosen] - (sums[rejected] - ref_sums[rejected]) / lengths[
                rejected
            ]
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            losses.append(
                -F.logsigmoid(
                    beta * (sums[chosen] / lengths[chosen] - sums[rejected] / lengths[rejected]) - simpo_gamma
                )
            )
    loss = sum(losses) / pairs
    if nll_weight > 0:
        chosen_tokens = int(mask[:pairs].sum())
        loss = loss + nll_weight * -sum(sums[:pairs]) / max(chosen_tokens, 1)
    return loss


def minor_sft(hidden, weight, targets, *, ref_logp, beta=0.1, length_normalized=False, loss_mask=None, **options):
    logp, _, mask = token_terms(hidden, weight, targets, loss_mask, **options)
    losses = []
    for i in range(targets.shape[0]):
        m = int(mask[i].sum())
        if m == 0:
            continue
        delta = (logp[i][mask[i]] - ref_logp[i][mask[i]]).sum()
        if length_normalized:
            losses.append(-(2 / beta) * F.logsigmoid(beta * delta / m))
        else:
            losses.append(-(2 / (beta * m)) * F.logsigmoid(beta * delta))
    return sum(losses) / len(losses) if losses else torch.zeros((), dtype=torch.float64)


def ift(hidden, weight, targets, *, gamma=0.95, loss_mask=None, **options):
    """mean_i of (sum_t G_t) / (sum_t D_t) with G_t the discounted future NLL and D_t its discount mass."""
    logp, _, mask = token_terms(hidden, weight, targets, loss_mask, **options)
    losses = []
    for i in range(targets.shape[0]):
        nll = [-logp[i, t] for t in range(targets.shape[1]) if mask[i, t]]
        if not nll:
            continue
        returns = [sum(gamma ** (k - t) * nll[k] for k in range(t, len(nll))) for t in range(len(nll))]
        masses = [sum(gamma ** (k - t) for k in range(t, len(nll))) for t in range(len(nll))]
        losses.append(sum(returns) / sum(masses))
    return sum(losses) / len(losses) if losses else torch.zeros((), dtype=torch.float64)


def cispo(
    hidden,
    weight,
    targets,
    *,
    advantages,
    old_logp=None,
    ref_logp=None,
    loss_mask=None,
    epsilon_low=1.0,
    epsilon_high=0.28,
    beta=0.0,
    aggregation="token-mean",
    **options,
):
    """-sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A_t * logp_t (+ beta * k3), one token at a time."""
    logp, _, mask = token_terms(hidden, weight, targets, loss_mask, **options)
    batch, length = targets.shape
    losses = []
    for i in range(batch):
        seq = []
        for t in range(length):
            if not mask[i, t]:
                continue
            adv = advantages[i] if advantages.dim() == 1 else advantages[i, t]
            old = old_logp[i, t] if old_logp is not None else logp[i, t].detach()
            ratio = math.exp(min(max(float(logp[i, t] - old), -20.0), 20.0))
            loss = -min(max(ratio, 1 - epsilon_low), 1 + epsilon_high) * adv * logp[i, t]
            if beta > 0:
                delta = torch.clamp(ref_logp[i, t] - logp[i, t], -20, 20)
                loss = loss + beta * torch.clamp(torch.exp(delta) - delta - 1, -10, 10)
            seq.append(loss)
        losses.append(seq)
    return aggregate_loops(losses, length)[aggregation]


def gmpo(
    hidden, weight, targets, *, advantages, old_logp=None, loss_mask=None, epsilon_low=0.4, epsilon_high=0.4, **options
):
    """-mean_i A_i exp(mean_t log m_t), log m_t the log-ratio clipped pessimistically for the sign of A_i."""
    logp, _, mask = token_terms(hidden, weight, targets, loss_mask, **options)
    batch, length = targets.shape
    objectives = []
    for i in range(batch):
        log_m = []
        for t in range(length):
            if not mask[i, t]:
                continue
            old = old_logp[i, t] if old_logp is not None else logp[i, t].detach()
            ratio = torch.clamp(logp[i, t] - old, -20, 20)
            clipped = torch.clamp(ratio, -epsilon_low, epsilon_high)
            log_m.append(torch.minimum(ratio, clipped) if advantages[i] > 0 else torch.maximum(ratio, clipped))
        if log_m:
            objectives.append(advantages[i] * torch.exp(sum(log_m) / len(log_m)))
    return -sum(objectives) / len(objectives) if objectives else torch.zeros((), dtype=torch.float64)

"""grpo_loss's TRL 1.16 loss types and options (docs/objectives.md, "Policy gradient").

A float64 reference written from TRL's GRPOTrainer._compute_loss, one token at a time, is checked against TRL itself
(its _compute_loss on a stand-in trainer) and against Liger-Kernel's LigerFusedLinearGRPOLoss; grpo_loss is then
checked against the reference on both engines, in the packed layout, under accumulation, against Liger directly, and
on bad input.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import fused_hybrid
from tests.reference import assert_close_scaled, grads, leaf64, logprobs_entropy64

BACKENDS = ("torch", "triton")
B, T, D, V = 4, 6, 16, 32
CLIPPED = ("dapo", "bnpo", "grpo", "dr_grpo", "luspo")
AGGREGATION = {
    "dapo": "token-mean",
    "bnpo": "token-mean",
    "grpo": "seq-mean-token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "cispo": "token-mean",
    "sapo": "seq-mean-token-mean",
    "luspo": "seq-mean-token-sum",
    "vespo": "token-mean",
}
VESPO_FLOOR = math.log(1e-8)
SAMPLER_BOUNDS = dict(sampler_clip_min=0.5, sampler_clip_max=2.0)
OFF_POLICY = 0.3  # below sequence 2's mean divergence (>= 0.5), above sequence 0's (< 0): see rollout


# ---------------------------------------------------------------------------------------------------------------------
# The float64 reference


def sampler_weights(differences, mode, clip_min, clip_max):
    """TRL's vLLM importance weights of one sequence's loss tokens from their old - sampler differences."""
    differences = [0.0 if math.isnan(d) else d for d in differences]  # a token the sampler did not score
    if mode.startswith("sequence"):
        differences = [sum(differences)] * len(differences)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    weights = [math.exp(d) for d in differences]
    if mode.endswith("truncate"):
        return [min(max(w, low), high) for w in weights]
    return [w if low <= w <= high else 0.0 for w in weights]


def gamma_weight(log_ratios, sampler, advantage, k_pos, lambda_pos, k_neg, lambda_neg):
    """TRL's get_gamma_weights for one token: phi(w) of its sequence's summed log-ratio (and log sampler weights)."""
    log_w = sum(min(max(x, -20.0), 20.0) for x in log_ratios)
    log_w += sum(min(max(math.log(s), VESPO_FLOOR), 20.0) if s > 0 else VESPO_FLOOR for s in sampler)
    log_w = min(max(log_w, VESPO_FLOOR), 20.0)
    k, lam = (k_pos, lambda_pos) if advantage >= 0 else (k_neg, lambda_neg)
    phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
    return phi if math.isfinite(phi) else 0.0


def reduce(losses, aggregation, num_items, max_response_length):
    """losses: one list of token losses per sequence; the counts are of the sequences holding a loss token."""
    kept = [seq for seq in losses if seq]
    tokens = [x for seq in kept for x in seq]
    if aggregation == "token-mean":
        return sum(tokens) / (num_items or len(tokens))
    count = num_items or len(kept)
    if aggregation == "seq-mean-token-mean":
        return sum(sum(seq) / len(seq) for seq in kept) / count
    if aggregation == "seq-mean-token-sum":
        return sum(sum(seq) for seq in kept) / count
    return sum(tokens) / (count * max_response_length)


def reference(
    hidden,
    weight,
    targets,
    bias=None,
    *,
    advantages,
    old_logp=None,
    ref_logp=None,
    sampler_logp=None,
    loss_mask=None,
    loss_type="dapo",
    epsilon_low=0.2,
    epsilon_high=None,
    dual_clip=3.0,
    delta=None,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
    sampler_correction="token_truncate",
    sampler_clip_min=None,
    sampler_clip_max=3.0,
    off_policy_mask_threshold=None,
    use_bias_correction_kl=False,
    top_entropy_quantile=1.0,
    beta=0.0,
    entropy_coef=0.0,
    importance_sampling=None,
    aggregation=None,
    num_items=None,
    max_response_length=None,
    **head,
):
    """TRL's _compute_loss token by token, plus our dual clip and per-token entropy bonus (float64 leaves in)."""
    logp, entropy = logprobs_entropy64(hidden, weight, targets, bias, **head)
    mask = targets != -100
    if loss_mask is not None:
        mask = mask & loss_mask.bool()
    if epsilon_high is None:
        epsilon_high = 5.0 if loss_type == "cispo" else 0.2
    if importance_sampling is None:
        importance_sampling = "sequence" if loss_type == "luspo" else "token"
    entropy_floor = -math.inf
    if top_entropy_quantile < 1:  # get_high_entropy_mask
        entropy_floor = torch.quantile(entropy.detach()[mask], 1 - top_entropy_quantile).item()
    losses = []
    for i in range(targets.shape[0]):
        positions = [t for t in range(targets.shape[1]) if mask[i, t]]
        advantage = [float(advantages[i] if advantages.dim() == 1 else advantages[i, t]) for t in positions]
        old = [logp[i, t].detach() if old_logp is None else old_logp[i, t].double() for t in positions]
        log_ratio = [logp[i, t] - o for t, o in zip(positions, old)]
        log_weight = log_ratio
        if importance_sampling == "sequence" and positions:  # one ratio, differentiated through every token
            log_weight = [sum(log_ratio) / len(positions)] * len(positions)
        ratio = [torch.exp(torch.clamp(x, -20, 20)) for x in log_weight]
        sampler = []
        if sampler_logp is not None:
            differences = [float(o) - float(sampler_logp[i, t]) for t, o in zip(positions, old)]
            sampler = sampler_weights(differences, sampler_correction, sampler_clip_min, sampler_clip_max)
        keep = [True] * len(positions)
        if off_policy_mask_threshold is not None:  # get_off_policy_mask
            sampling = old if sampler_logp is None else [sampler_logp[i, t] for t in positions]
            divergence = [float(s) - float(logp.detach()[i, t]) for s, t in zip(sampling, positions)]
            divergence = [0.0 if math.isnan(x) else x for x in divergence]
            near = sum(divergence) / max(len(positions), 1) <= off_policy_mask_threshold
            keep = [a >= 0 or near for a in advantage]
        keep = [k and float(entropy.detach()[i, t]) >= entropy_floor for k, t in zip(keep, positions)]
        sequence = []
        for n, t in enumerate(positions):
            a, r = advantage[n], ratio[n]
            if loss_type in CLIPPED:
                unclipped = r if delta is None else torch.clamp(r, max=delta)
                loss = -torch.minimum(unclipped * a, torch.clamp(r, 1 - epsilon_low, 1 + epsilon_high) * a)
                if dual_clip is not None and a < 0:
                    loss = torch.clamp(loss, max=-dual_clip * a)
            elif loss_type == "cispo":
                loss = -torch.clamp(r, max=epsilon_high).detach() * a * logp[i, t]
            elif loss_type == "sapo":
                tau = sapo_temperature_pos if a > 0 else sapo_temperature_neg
                loss = -torch.sigmoid(tau * (r - 1)) * 4 / tau * a
            else:
                phi = gamma_weight(
                    [float(x.detach()) for x in log_ratio],
                    sampler,
                    a,
                    vespo_k_pos,
                    vespo_lambda_pos,
                    vespo_k_neg,
                    vespo_lambda_neg,
                )
                loss = -phi * a * logp[i, t]
            loss = loss * keep[n]
            if sampler and loss_type != "vespo":  # vespo folds the sampler weight into phi
                loss = loss * sampler[n]
            if beta > 0:
                d = ref_logp[i, t].double() - logp[i, t]
                kl = torch.exp(d) - d - 1
                loss = loss + beta * (kl * r if use_bias_correction_kl else kl)
            sequence.append(loss - entropy_coef * entropy[i, t])  # ours: every loss token (TRL: a separate mean)
        losses.append(sequence)
    return reduce(losses, aggregation or AGGREGATION[loss_type], num_items, max_response_length or targets.shape[1])


# ---------------------------------------------------------------------------------------------------------------------
# Batches and cases


def make_batch(empty_row=False):
    hidden = torch.randn(B, T, D).requires_grad_()
    weight = (torch.randn(V, D) * 2 / D**0.5).requires_grad_()
    bias = (torch.randn(V) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (B, T))
    targets[torch.rand(B, T) < 0.2] = -100
    loss_mask = (torch.rand(B, T) > 0.15).long()
    loss_mask[:, 0] = 0  # a prompt token
    targets[:, -1] = torch.randint(0, V, (B,))  # every sequence holds a loss token: TRL and Liger divide by all rows
    loss_mask[:, -1] = 1
    if empty_row:
        loss_mask[1] = 0
    return hidden, weight, bias, targets, loss_mask


def rollout(batch, *, per_token_advantages, on_policy, sampler, near, ref, garbage, head):
    """Rollout tensors around the current policy, built so that every clip and mask bites.

    Advantages per sequence are -, +, -, +. Sequence 0 is far behind its rollout policy (ratios 3.3..25: the dual
    clip and delta bite, per token and per sequence), sequence 2 far ahead (ratios 0.05..0.37; mean divergence >= 0.5
    > OFF_POLICY, with or without the sampler); `near` leaves the shifts out (vespo weights far from 0 on every
    sequence). The sampler ratio exp(old - sampler) is >= e on sequence 0 and <= 1/e on sequence 1, per token and
    per sequence outside SAMPLER_BOUNDS; sequence 3's last token was not scored (NaN). With `garbage` the per-token
    tensors hold NaN outside the loss, which must reach neither the loss nor the gradients.
    """
    hidden, weight, bias, targets, loss_mask = batch
    with torch.no_grad():
        logp = logprobs_entropy64(hidden, weight, targets, bias, **head)[0].float()

    def uniform(scale, *shifts):
        return (torch.rand(B, T) * 2 - 1) * scale + torch.tensor(shifts)[:, None]

    inputs = dict(advantages=torch.tensor([-1.0, 1.0, -1.0, 1.0]) * (0.5 + torch.rand(B)))
    if per_token_advantages:
        inputs["advantages"] = torch.randn(B, T)
    old_logp = logp + (uniform(0.3, 0, 0, 0, 0) if near else uniform(1.0, -2.2, 0, 2.0, 0))
    inputs["old_logp"] = None if on_policy else old_logp
    if sampler:
        inputs["sampler_logp"] = (logp if on_policy else old_logp) + uniform(0.5, -1.5, 1.5, 0, 0)
        inputs["sampler_logp"][3, -1] = float("nan")
    if ref:
        inputs["ref_logp"] = logp + uniform(1.0, 0, 0, 0, 0)
    if garbage:
        outside = (targets == -100) | ~loss_mask.bool()
        for name, value in inputs.items():
            if value is not None and value.shape == targets.shape:
                inputs[name] = value.masked_fill(outside, float("nan"))
    return inputs


FLAGS = ("per_token_advantages", "on_policy", "sampler", "near", "empty_row")
HEAD = ("temperature", "softcap")


def case_inputs(case, garbage=True):
    """The batch (hidden, weight, bias, targets, loss_mask), its rollout inputs and grpo_loss's options."""
    options = {k: v for k, v in case.items() if k not in FLAGS}
    flags = {k: case.get(k, False) for k in FLAGS}
    batch = make_batch(flags.pop("empty_row"))
    head = {k: options[k] for k in HEAD if k in options}
    inputs = rollout(batch, **flags, ref=options.get("beta", 0) > 0, garbage=garbage, head=head)
    return batch, inputs, options


SAMPLER = dict(sampler=True, **SAMPLER_BOUNDS)
BIAS_KL = dict(beta=0.1, use_bias_correction_kl=True)
VESPO = dict(vespo_k_pos=1.0, vespo_lambda_pos=1.5, vespo_k_neg=2.0, vespo_lambda_neg=0.5)
CASES = [
    *[(loss_type, dict(loss_type=loss_type)) for loss_type in AGGREGATION],
    ("vespo-near", dict(loss_type="vespo", near=True)),
    ("dapo-delta", dict(delta=1.5, epsilon_high=0.28)),
    ("dr_grpo-delta-sequence", dict(loss_type="dr_grpo", delta=1.5, importance_sampling="sequence")),
    ("grpo-sequence-token-adv", dict(loss_type="grpo", importance_sampling="sequence", per_token_advantages=True)),
    ("bnpo-sequence-bias-kl", dict(loss_type="bnpo", importance_sampling="sequence", **BIAS_KL)),
    ("dapo-bias-kl-token-adv", dict(per_token_advantages=True, **BIAS_KL)),
    ("dapo-kl", dict(beta=0.1, epsilon_low=0.1, epsilon_high=0.3)),
    ("dapo-bias-kl", BIAS_KL),
    ("grpo-sequence-delta", dict(loss_type="grpo", importance_sampling="sequence", delta=1.5)),
    ("luspo-delta", dict(loss_type="luspo", delta=1.5)),
    ("cispo-sequence", dict(loss_type="cispo", importance_sampling="sequence", epsilon_high=1.3)),
    ("sapo-sequence-kl", dict(loss_type="sapo", importance_sampling="sequence", beta=0.1)),
    ("luspo-bias-kl", dict(loss_type="luspo", **BIAS_KL)),
    ("luspo-token", dict(loss_type="luspo", importance_sampling="token")),
    ("cispo-cap-kl", dict(loss_type="cispo", epsilon_high=1.3, beta=0.1)),
    ("cispo-bias-kl", dict(loss_type="cispo", epsilon_high=1.3, **BIAS_KL)),
    ("sapo-temperatures", dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0)),
    ("sapo-token-adv-kl", dict(loss_type="sapo", per_token_advantages=True, beta=0.1)),
    ("vespo-k-lambda", dict(loss_type="vespo", near=True, **VESPO)),
    ("vespo-token-adv-bias-kl", dict(loss_type="vespo", near=True, per_token_advantages=True, **BIAS_KL)),
    ("dapo-token_truncate", dict(sampler_correction="token_truncate", **SAMPLER)),
    ("grpo-token_mask", dict(loss_type="grpo", sampler_correction="token_mask", **SAMPLER)),
    ("cispo-sequence_truncate", dict(loss_type="cispo", sampler_correction="sequence_truncate", **SAMPLER)),
    ("sapo-sequence_mask", dict(loss_type="sapo", sampler_correction="sequence_mask", **SAMPLER)),
    ("luspo-sequence_truncate", dict(loss_type="luspo", sampler_correction="sequence_truncate", **SAMPLER)),
    (
        "bnpo-sequence-sequence_mask-kl",
        dict(loss_type="bnpo", importance_sampling="sequence", beta=0.1, sampler_correction="sequence_mask", **SAMPLER),
    ),
    ("vespo-token_truncate", dict(loss_type="vespo", near=True, sampler=True)),  # the default bounds, [-, 3]
    ("vespo-token_mask", dict(loss_type="vespo", near=True, sampler_correction="token_mask", **SAMPLER)),
    ("dapo-on-policy-sampler-bias-kl", dict(on_policy=True, **SAMPLER, **BIAS_KL)),
    ("sapo-on-policy", dict(loss_type="sapo", on_policy=True)),
    ("dapo-off-policy", dict(off_policy_mask_threshold=OFF_POLICY)),
    ("grpo-off-policy-sampler", dict(loss_type="grpo", off_policy_mask_threshold=OFF_POLICY, **SAMPLER)),
    (
        "bnpo-sequence-off-policy-token-adv",
        dict(
            loss_type="bnpo",
            importance_sampling="sequence",
            off_policy_mask_threshold=OFF_POLICY,
            per_token_advantages=True,
        ),
    ),
    ("vespo-off-policy-sampler", dict(loss_type="vespo", off_policy_mask_threshold=OFF_POLICY, sampler=True)),
    ("dapo-top-entropy-0.5", dict(top_entropy_quantile=0.5)),
    ("grpo-top-entropy-0", dict(loss_type="grpo", top_entropy_quantile=0.0)),
    ("cispo-top-entropy-0.5-sampler", dict(loss_type="cispo", top_entropy_quantile=0.5, **SAMPLER)),
    (
        "grpo-sequence-top-entropy-token-adv",
        dict(loss_type="grpo", importance_sampling="sequence", top_entropy_quantile=0.5, per_token_advantages=True),
    ),
    ("dr_grpo-temperature-kl", dict(loss_type="dr_grpo", temperature=0.8, beta=0.1)),
    # ours only: the dual clip, the per-token entropy bonus, aggregation overrides, softcap, sequences without a
    # loss token (not counted)
    ("dapo-no-dual-clip", dict(dual_clip=None, epsilon_high=0.28)),
    ("grpo-dual-clip-2-delta", dict(loss_type="grpo", dual_clip=2.0, delta=4.0)),
    ("grpo-entropy-bonus-top-entropy", dict(loss_type="grpo", entropy_coef=0.01, top_entropy_quantile=0.5)),
    ("dapo-as-seq-mean-softcap", dict(aggregation="seq-mean-token-mean", softcap=5.0)),
    ("sapo-as-token-mean-entropy-bonus", dict(loss_type="sapo", aggregation="token-mean", entropy_coef=0.02)),
    ("grpo-sequence-empty-row", dict(loss_type="grpo", importance_sampling="sequence", empty_row=True, **SAMPLER)),
    ("dr_grpo-empty-row", dict(loss_type="dr_grpo", empty_row=True, off_policy_mask_threshold=OFF_POLICY)),
]
OURS_ONLY = ("dual_clip", "entropy_coef", "aggregation", "softcap", "empty_row")


def trl_has(case):
    return not any(name in case for name in OURS_ONLY)


def liger_has(case):
    """Liger takes (B,) advantages, has no off-policy or entropy mask and refuses the sequence ratio for cispo, sapo
    and vespo; its luspo multiplies the per-token losses by the length without the mask (TRL masks), which matters
    when they are per token: token ratios, the KL, token sampler weights."""
    loss_type = case.get("loss_type")
    token_luspo = loss_type == "luspo" and (
        case.get("importance_sampling") == "token"
        or case.get("beta")
        or (case.get("sampler") and not case.get("sampler_correction", "").startswith("sequence"))
    )
    refused = loss_type in ("cispo", "sapo", "vespo") and case.get("importance_sampling") == "sequence"
    unsupported = ("per_token_advantages", "off_policy_mask_threshold", "top_entropy_quantile")
    return trl_has(case) and not token_luspo and not refused and not any(name in case for name in unsupported)


def cases(predicate=None):
    return [pytest.param(case, id=name) for name, case in CASES if predicate is None or predicate(case)]


# ---------------------------------------------------------------------------------------------------------------------
# The peers: TRL's _compute_loss on a stand-in trainer, Liger's fused loss


class SingleProcess:
    """What _compute_loss asks of the accelerator, for one process."""

    num_processes = 1

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        return tensor

    def gather(self, tensor):
        return tensor

    def reduce(self, tensor, reduction="sum"):
        return tensor


def sampler_mode(options):
    return (
        options.get("sampler_correction", "token_truncate"),
        options.get("sampler_clip_min"),
        options.get("sampler_clip_max", 3.0),
    )


def trl_sampler_ratio(old_logp, sampler_logp, mask, mode, clip_min, clip_max):
    """importance_sampling_ratio as GRPOTrainer._generate_and_score_completions computes it (vLLM correction)."""
    difference = torch.nan_to_num((old_logp - sampler_logp) * mask, nan=0.0)
    if mode.startswith("sequence"):
        difference = difference.sum(dim=-1, keepdim=True)
    ratio = torch.exp(difference)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


TRL_ARGS = dict(
    delta=None,
    use_bias_correction_kl=False,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
)


def trl_loss(logp, entropy, mask, inputs, options):
    """GRPOTrainer._compute_loss (TRL 1.16) on [B, T] log-probs and entropies; `options` in grpo_loss's names."""
    trainer_class = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer
    loss_type = options.get("loss_type", "dapo")

    class StandIn:
        get_high_entropy_mask = trainer_class.get_high_entropy_mask
        get_off_policy_mask = staticmethod(trainer_class.get_off_policy_mask)
        get_gamma_weights = staticmethod(trainer_class.get_gamma_weights)

    sampler = inputs.get("sampler_logp")
    args = {k: options.get(k, v) for k, v in TRL_ARGS.items()}
    trainer = StandIn()
    trainer.__dict__.update(
        loss_type=loss_type,
        beta=options.get("beta", 0.0),
        epsilon_low=options.get("epsilon_low", 0.2),
        epsilon_high=options.get("epsilon_high", 5.0 if loss_type == "cispo" else 0.2),
        importance_sampling_level=options.get("importance_sampling", "sequence" if loss_type == "luspo" else "token"),
        top_entropy_quantile=options.get("top_entropy_quantile", 1.0),
        off_policy_mask_threshold=options.get("off_policy_mask_threshold"),
        max_completion_length=mask.shape[1],
        use_vllm=sampler is not None,
        vllm_importance_sampling_correction=True,
        current_gradient_accumulation_steps=1,
        accelerator=SingleProcess(),
        model=SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list)},
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logp, entropy, None),
        args=SimpleNamespace(steps_per_generation=1, **args),
    )
    old = inputs.get("old_logp")
    batch = dict(
        prompt_ids=torch.zeros(mask.shape[0], 0, dtype=torch.long),
        prompt_mask=torch.zeros(mask.shape[0], 0, dtype=torch.long),
        completion_ids=torch.zeros(mask.shape, dtype=torch.long),
        completion_mask=mask,
        advantages=inputs["advantages"],
        old_per_token_logps=old,
        ref_per_token_logps=inputs.get("ref_logp"),
        num_items_in_batch=mask.sum(),
    )
    if sampler is not None:  # with vLLM TRL always computes the old log-probs
        batch["old_per_token_logps"] = old = logp.detach() if old is None else old
        batch["sampling_per_token_logps"] = sampler
        batch["importance_sampling_ratio"] = trl_sampler_ratio(old, sampler, mask, *sampler_mode(options))
    return trainer_class._compute_loss(trainer, None, batch)


def liger_loss(batch, inputs, options):
    """LigerFusedLinearGRPOLoss(compiled=False) on the batch. The mapping: our loss mask is its attention_mask
    (ignored targets become token 0 there, masked); its normalisers count all rows and full_attention_mask's tokens
    (every row holds a loss token here); dr_grpo's max_completion_length is T; the sampler ratio goes in precomputed
    as TRL computes it (vllm_is_ratio, (B, T) or (B, 1)); num_items_in_batch left None is its dapo / cispo / vespo
    normaliser's default, the batch's token count; advantages per sequence only."""
    chunked_loss = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, bias, targets, loss_mask = batch
    mask = (targets != -100) & loss_mask.bool()
    loss_type = options.get("loss_type", "dapo")
    config = {k: v for k, v in options.items() if not k.startswith("sampler_") and k != "importance_sampling"}
    config["importance_sampling_level"] = options.get(
        "importance_sampling", "sequence" if loss_type == "luspo" else "token"
    )
    config.setdefault("epsilon_high", 5.0 if loss_type == "cispo" else 0.2)
    config.setdefault("beta", 0.0)
    module = chunked_loss.LigerFusedLinearGRPOLoss(
        compiled=False, use_ref_model=config["beta"] > 0, chunk_size=2, max_completion_length=T, **config
    )
    sampler_ratio = None
    if inputs.get("sampler_logp") is not None:
        old = inputs["old_logp"]
        if old is None:
            with torch.no_grad():
                old = logprobs_entropy64(hidden, weight, targets, bias, temperature=config.get("temperature", 1.0))
                old = old[0].float()
        sampler_ratio = trl_sampler_ratio(old, inputs["sampler_logp"], mask.float(), *sampler_mode(options))
    loss, _ = module(
        hidden,
        weight,
        torch.where(mask, targets, 0),
        mask.float(),
        inputs["advantages"],
        bias,
        ref_per_token_logps=inputs.get("ref_logp"),
        old_per_token_logps=inputs["old_logp"],
        vllm_is_ratio=sampler_ratio,
    )
    return loss


def reference_of(batch, inputs, options):
    """The reference on float64 copies of the batch's leaves, and those leaves."""
    hidden, weight, bias, targets, loss_mask = batch
    leaves = [leaf64(t) for t in (hidden, weight, bias)]
    return reference(leaves[0], leaves[1], targets, leaves[2], loss_mask=loss_mask, **inputs, **options), leaves


def assert_same(loss, leaves, expected, expected_leaves, rel=3e-5, loss_atol=1e-5, grad_atol=1e-7):
    """Loss and the gradients of hidden, weight and bias. The defaults are fp32's against float64 (or fp32): the
    loss's terms are O(A logp), and vespo's weight multiplies the log-probs' error by |k - lambda w|."""
    assert_close_scaled(loss, expected, rel, "loss", atol=loss_atol)
    pairs = zip(("d_hidden", "d_weight", "d_bias"), grads(loss, leaves), grads(expected, expected_leaves))
    for name, got, want in pairs:
        assert_close_scaled(got, want, rel, name, atol=grad_atol)


# ---------------------------------------------------------------------------------------------------------------------
# 1. The reference against TRL and Liger


@pytest.mark.parametrize("case", cases(trl_has))
def test_reference_is_trl(case):
    batch, inputs, options = case_inputs(case, garbage=False)
    expected, leaves = reference_of(batch, inputs, dict(options, dual_clip=None))
    head = {k: options.pop(k) for k in HEAD if k in options}
    targets, loss_mask = batch[3:]
    logp, entropy = logprobs_entropy64(leaves[0], leaves[1], targets, leaves[2], **head)
    mask = ((targets != -100) & loss_mask.bool()).double()
    inputs = {k: v.double() for k, v in inputs.items() if v is not None}
    # TRL takes the quantile of float32 entropies: float32 ones make its threshold one of the values it compares
    got = trl_loss(logp, entropy.detach().float(), mask, inputs, options)
    # not 1e-12: TRL's torch.where(advantages > 0, temperature_pos, temperature_neg) makes float32 temperatures
    assert_same(got, leaves, expected, leaves, 1e-6, loss_atol=1e-7, grad_atol=1e-9)


@pytest.mark.parametrize("case", cases(liger_has))
def test_reference_is_liger(case):
    batch, inputs, options = case_inputs(case, garbage=False)
    expected, leaves = reference_of(batch, inputs, dict(options, dual_clip=None))
    assert_same(liger_loss(batch, inputs, options), list(batch[:3]), expected, leaves)


BITES = [
    ("delta", dict(delta=1.5), {}),
    ("dual-clip", {}, dict(dual_clip=None)),
    (
        "sapo-temperatures",
        dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
        dict(loss_type="sapo"),
    ),
    ("vespo-k-lambda", dict(loss_type="vespo", **VESPO), dict(loss_type="vespo")),
    *[
        (
            f"{mode}-bounds",
            dict(sampler_correction=mode, **SAMPLER),
            dict(sampler_correction=mode, sampler=True, sampler_clip_max=None),
        )
        for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
    ],
    (
        "vespo-sampler-bounds",
        dict(loss_type="vespo", **SAMPLER),
        dict(loss_type="vespo", sampler=True, sampler_clip_max=None),
    ),
    ("off-policy", dict(off_policy_mask_threshold=OFF_POLICY), {}),
    ("off-policy-sampler", dict(off_policy_mask_threshold=OFF_POLICY, sampler=True), dict(sampler=True)),
    ("top-entropy-0.5", dict(top_entropy_quantile=0.5), {}),
    ("top-entropy-0", dict(top_entropy_quantile=0.0), dict(top_entropy_quantile=0.5)),
    ("bias-kl", BIAS_KL, dict(beta=0.1)),
    (
        "bias-kl-sequence",
        dict(importance_sampling="sequence", **BIAS_KL),
        dict(importance_sampling="sequence", beta=0.1),
    ),
]


@pytest.mark.parametrize("on, off", [pytest.param(on, off, id=name) for name, on, off in BITES])
def test_the_rollouts_make_every_option_bite(on, off):
    """Each option changes the reference's loss or gradients on the rollouts the other tests use."""
    batch, inputs, _ = case_inputs(dict(sampler=True, beta=0.1), garbage=False)
    results = []
    for case in (on, off):
        given = inputs if case.get("sampler") else dict(inputs, sampler_logp=None)
        options = {k: v for k, v in case.items() if k not in FLAGS}
        loss, leaves = reference_of(batch, given, options)
        results.append(torch.cat([loss.reshape(1), grads(loss, leaves)[0].reshape(-1)]))
    assert (results[0] - results[1]).abs().max() > 1e-4 * results[1].abs().max()


# ---------------------------------------------------------------------------------------------------------------------
# 2. grpo_loss against the reference


def fused(batch, inputs, options, **extra):
    hidden, weight, bias, targets, loss_mask = batch
    return fused_hybrid.grpo_loss(hidden, weight, targets, bias, loss_mask=loss_mask, **inputs, **options, **extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", cases(None))
def test_grpo_loss_matches_the_reference(backend, case):
    batch, inputs, options = case_inputs(case)
    output = fused(batch, inputs, options, backend=backend)
    for name, value in output.metrics.items():
        assert isinstance(value, torch.Tensor) and not value.requires_grad and value.dim() == 0, name
    expected, leaves = reference_of(batch, inputs, options)
    assert_same(output.loss, list(batch[:3]), expected, leaves)


PACKED = [
    dict(loss_type="dr_grpo", max_response_length=T, importance_sampling="sequence", **SAMPLER),
    dict(loss_type="grpo", off_policy_mask_threshold=OFF_POLICY, sampler_correction="sequence_mask", **SAMPLER),
    dict(loss_type="vespo", near=True, per_token_advantages=True, sampler=True),
    dict(loss_type="luspo", **BIAS_KL),
    dict(loss_type="cispo", top_entropy_quantile=0.5, entropy_coef=0.01),
]


# The loss is a normalised sum of O(1) terms +-A r that largely cancel (|loss| ~ 0.003-0.05): two fp32 computations
# of it that sum in other orders (other chunks, other layouts) differ by the rounding of those terms, a few ulps of
# 1, not of the net value (the packed layout once differed by 1.3e-7 at |loss| 3e-3). A wrong normaliser is off by
# ~1 / N of the result (~5%).
CANCELLING_LOSS_ATOL = 16 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", PACKED, ids=lambda case: case["loss_type"])
def test_packed_layout_equals_padded_layout(backend, case):
    batch, inputs, options = case_inputs(case)
    hidden, weight, bias, targets, loss_mask = batch
    lengths = torch.randint(2, T + 1, (B,))
    lengths[0] = T
    keep = torch.arange(T) < lengths[:, None]  # beyond each length: padding, out of the loss either way
    padded = fused((hidden, weight, bias, targets, loss_mask * keep), inputs, options, backend=backend)
    packed_hidden = hidden.detach()[keep].requires_grad_()
    packed = fused_hybrid.grpo_loss(
        packed_hidden,
        weight,
        targets[keep],
        bias,
        loss_mask=loss_mask[keep],
        sequence_ids=torch.arange(B)[:, None].expand(B, T)[keep],
        num_sequences=B,
        backend=backend,
        **{k: v[keep] if v is not None and v.shape == targets.shape else v for k, v in inputs.items()},
        **options,
    )
    assert_close_scaled(packed.loss, padded.loss, 1e-6, "loss", atol=CANCELLING_LOSS_ATOL)
    got = grads(packed.loss, [packed_hidden, weight, bias])
    want = grads(padded.loss, [hidden, weight, bias])
    assert (want[0][~keep] == 0).all()
    for name, g, w in zip(("d_hidden", "d_weight", "d_bias"), got, [want[0][keep], *want[1:]]):
        assert_close_scaled(g, w, 1e-6, name, atol=1e-8)


ACCUMULATION = [
    dict(loss_type="dapo", **SAMPLER, **BIAS_KL),
    dict(loss_type="grpo", importance_sampling="sequence", off_policy_mask_threshold=OFF_POLICY),
    dict(loss_type="dr_grpo", sampler_correction="sequence_truncate", **SAMPLER),
    dict(loss_type="luspo", entropy_coef=0.01),
    dict(loss_type="vespo", near=True, per_token_advantages=True, sampler=True),
    dict(loss_type="cispo", epsilon_high=1.3, sampler_correction="sequence_mask", **SAMPLER),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ACCUMULATION, ids=lambda case: case["loss_type"])
def test_micro_batches_with_num_items_sum_to_the_batch(backend, case):
    batch, inputs, options = case_inputs(case)
    hidden, weight, bias, targets, loss_mask = batch
    full = fused(batch, inputs, options, backend=backend)
    want = grads(full.loss, [hidden, weight, bias])
    mask = (targets != -100) & loss_mask.bool()
    token_mean = AGGREGATION[options["loss_type"]] == "token-mean"
    num_items = int(mask.sum()) if token_mean else int(mask.any(-1).sum())  # the global token or sequence count
    losses, d_hidden, d_weight, d_bias = [], [], 0, 0
    for rows in (slice(0, 1), slice(1, B)):
        part_hidden = hidden.detach()[rows].requires_grad_()
        part = (part_hidden, weight, bias, targets[rows], loss_mask[rows])
        part_inputs = {k: None if v is None else v[rows] for k, v in inputs.items()}
        output = fused(part, part_inputs, options, backend=backend, num_items=num_items)
        got = grads(output.loss, [part_hidden, weight, bias])
        losses.append(output.loss)
        d_hidden.append(got[0])
        d_weight, d_bias = d_weight + got[1], d_bias + got[2]
    # Two fp32 computations of the same sums (the micro-batches' chunks hold other rows, so every GEMM and sum rounds
    # in another order): see CANCELLING_LOSS_ATOL; each gradient entry a sum over V whose terms exceed it: their
    # rounding is the terms' (here up to ~12 ulps of the result's scale), not the net value's.
    assert_close_scaled(sum(losses), full.loss, 1e-6, "loss", atol=CANCELLING_LOSS_ATOL)
    for name, got, expected in zip(("d_hidden", "d_weight", "d_bias"), (torch.cat(d_hidden), d_weight, d_bias), want):
        assert_close_scaled(got, expected, 1e-5, name, atol=1e-8)


def test_trls_option_names_mean_what_they_mean_in_trl():
    """TRL's GRPOConfig names: `epsilon` is the lower clip and, unless epsilon_high is given, the upper one;
    `importance_sampling_level` is importance_sampling; giving a name and its alias together is refused."""
    batch, inputs, _ = case_inputs({"loss_type": "grpo"})

    def loss(**options):
        return fused(batch, inputs, {"loss_type": "grpo", **options}).loss

    assert torch.equal(loss(epsilon=0.1), loss(epsilon_low=0.1, epsilon_high=0.1))
    assert torch.equal(loss(epsilon=0.1, epsilon_high=0.28), loss(epsilon_low=0.1, epsilon_high=0.28))
    assert not torch.equal(loss(epsilon=0.05), loss())  # the clip moved
    assert torch.equal(loss(importance_sampling_level="sequence"), loss(importance_sampling="sequence"))
    module = fused_hybrid.GRPOLoss(loss_type="grpo", epsilon=0.1, importance_sampling_level="sequence")
    hidden, weight, bias, targets, loss_mask = batch
    got = module(hidden, weight, targets, bias, loss_mask=loss_mask, **inputs)
    assert torch.equal(got, loss(epsilon_low=0.1, epsilon_high=0.1, importance_sampling="sequence"))
    for both in (
        dict(epsilon=0.1, epsilon_low=0.2),
        dict(importance_sampling="token", importance_sampling_level="token"),
    ):
        with pytest.raises(ValueError, match=r"give \w+ or \w+ \(TRL's name for it\), not both"):
            loss(**both)


# ---------------------------------------------------------------------------------------------------------------------
# 3. grpo_loss against Liger


@pytest.mark.parametrize("case", cases(liger_has))
def test_grpo_loss_matches_liger(case):
    batch, inputs, options = case_inputs(case, garbage=False)
    ours = fused(batch, inputs, options, dual_clip=None)
    theirs = liger_loss(batch, inputs, options)
    assert_same(ours.loss, list(batch[:3]), theirs, list(batch[:3]))


# ---------------------------------------------------------------------------------------------------------------------
# 4. Bad input


@pytest.fixture
def no_kernel_runs(monkeypatch):
    from fused_hybrid.engine.backends import logits_free_backend

    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran before validation")

    monkeypatch.setattr(logits_free_backend("torch"), "partials", forbidden)


def good_call(**change):
    batch, inputs, _ = case_inputs(dict(sampler=True))
    hidden, weight, bias, targets, loss_mask = batch
    kwargs = dict(loss_mask=loss_mask, backend="torch", **inputs)
    kwargs.update(change)
    return lambda: fused_hybrid.grpo_loss(hidden, weight, targets, bias, **kwargs)


def test_the_kernel_guard_catches_a_valid_call(no_kernel_runs):
    with pytest.raises(AssertionError, match="a kernel ran"):
        good_call()()


BAD = [
    (dict(loss_type="ppo"), "loss_type"),
    (dict(sampler_correction="token"), "sampler_correction"),
    (dict(loss_type="cispo", epsilon_high=1.0), "epsilon_high"),
    (dict(loss_type="cispo", epsilon_high=0.28), "epsilon_high"),
    (dict(loss_type="vespo", importance_sampling="sequence"), "importance_sampling"),
    (dict(loss_type="vespo", sampler_correction="sequence_truncate"), "sampler_correction"),
    (dict(loss_type="vespo", sampler_correction="sequence_mask"), "sampler_correction"),
    (dict(importance_sampling="tokens"), "importance_sampling"),
    (dict(top_entropy_quantile=-0.1), "top_entropy_quantile"),
    (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
    (dict(loss_type="sapo", sapo_temperature_pos=0.0), "sapo_temperature_pos"),
    (dict(loss_type="sapo", sapo_temperature_neg=-1.0), "sapo_temperature_neg"),
    (dict(delta=0.5), "delta"),
    (dict(sampler_logp=torch.zeros(B, T - 1)), "sampler_logp"),
    (dict(sampler_logp=torch.zeros(B)), "sampler_logp"),  # log-probs are per token
    (dict(off_policy_mask_threshold=-0.1), "off_policy_mask_threshold"),
]


def bad_id(change):
    return ",".join(f"{k}={tuple(v.shape) if isinstance(v, torch.Tensor) else v}" for k, v in change.items())


@pytest.mark.parametrize("change, name", [pytest.param(change, name, id=bad_id(change)) for change, name in BAD])
def test_bad_input_is_named(no_kernel_runs, change, name):
    with pytest.raises(ValueError, match=re.escape(name)):
        good_call(**change)()

"""DPO family (docs/objectives.md, "Preference"): sigmoid DPO, IPO and SimPO, with an optional NLL term on the
chosen responses.

Layout: a batch of 2P sequences, the P chosen responses first and then the P rejected ones in the same prompt
order (sequence i is chosen, sequence P + i its rejected twin), in either the [2P, T] or the packed layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_non_negative, check_positive
from ..engine.head import HeadSpec
from ..reduction import check_num_items, divide_by_count
from .registry import Objective, register
from .tokens import LossOutput, TokenBatch, TokenLayout, evaluate_head, evaluate_objective, objective_module

PREFERENCE_LOSSES = ("sigmoid", "ipo", "simpo")


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
        batch.require_sequences("dpo_loss")
        if batch.num_sequences % 2:
            raise ValueError(
                f"dpo_loss needs an even number of sequences (P chosen then P rejected), got {batch.num_sequences}"
            )
        pairs = batch.num_sequences // 2
        policy, reference = policy_and_reference_sums(batch, None if loss_type == "simpo" else ref_logp)
        lengths = batch.seq_tokens().clamp(min=1)
        if loss_type == "simpo":
            rewards = beta * policy / lengths
            losses = -F.logsigmoid(rewards[:pairs] - rewards[pairs:] - simpo_gamma)
        elif loss_type == "sigmoid":
            rewards = beta * (policy - reference)
            losses = -F.logsigmoid(rewards[:pairs] - rewards[pairs:])
        else:
            log_ratio = (policy - reference) / lengths
            rewards = beta * log_ratio
            losses = (log_ratio[:pairs] - log_ratio[pairs:] - 1.0 / (2.0 * beta)) ** 2
        preference = divide_by_count(losses.sum(), pairs if num_items is None else num_items)

        chosen = batch.restrict(batch.seq_index < pairs)
        nll = divide_by_count(
            chosen.keep(-batch.logp).sum(), chosen.num_tokens() if num_chosen_tokens is None else num_chosen_tokens
        )
        loss = preference + nll_weight * nll if nll_weight > 0 else preference
        rewards = rewards.detach()
        metrics = {
            "preference_loss": preference.detach(),
            "nll_loss": nll.detach(),
            "reward_chosen": rewards[:pairs].mean(),
            "reward_rejected": rewards[pairs:].mean(),
            "reward_margin": (rewards[:pairs] - rewards[pairs:]).mean(),
            "reward_accuracy": (rewards[:pairs] > rewards[pairs:]).to(rewards.dtype).mean(),
        }
        return LossOutput(loss, metrics)

    head = HeadSpec.resolve(head, head_options)
    layout = TokenLayout.read(
        targets, head, loss_mask=loss_mask, sequence_ids=sequence_ids, num_sequences=num_sequences
    )
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
        metric_counts={
            "preference_loss": "sum",
            "nll_loss": "sum",
            "reward_chosen": "pairs",
            "reward_rejected": "pairs",
            "reward_margin": "pairs",
            "reward_accuracy": "pairs",
        },
    )
)

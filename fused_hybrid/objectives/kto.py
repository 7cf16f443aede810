"""KTO (docs/objectives.md, "KTO, ORPO and CPO"): unpaired preferences, each sequence desirable or undesirable,
scored against a detached KL reference point.

Layout: any batch of sequences ([B, T] or packed), with one ``desirable`` flag per sequence.
"""

from __future__ import annotations

import numbers

import torch

from ..checks import check_non_negative, check_positive, fail_where
from ..engine.head import HeadSpec
from ..reduction import check_num_items, divide_by_count, mean_count
from .preference import policy_and_reference_sums
from .registry import Objective, register
from .tokens import LossOutput, TokenBatch, TokenLayout, evaluate_head, evaluate_objective, objective_module


def check_kto_options(*, beta: float, desirable_weight: float, undesirable_weight: float) -> None:
    check_positive("beta", beta)
    check_non_negative("desirable_weight", desirable_weight)
    check_non_negative("undesirable_weight", undesirable_weight)


def check_kl(kl) -> None:
    """`kl`: None, a number or a scalar tensor, finite and >= 0 (a tensor's value checked where it lives)."""
    if kl is None:
        return
    if isinstance(kl, torch.Tensor):
        if kl.numel() != 1:
            raise ValueError(f"kl must be a scalar (the KL estimate of kto_kl_estimate), got shape {tuple(kl.shape)}")
        if not kl.is_floating_point():
            raise TypeError(f"kl must be a floating-point tensor, got {kl.dtype}")
        value = kl.detach().reshape(())
        fail_where(
            ~(value >= 0) | ~value.isfinite(),
            "kl must be a finite number >= 0 (TRL clamps its estimate at 0; see kto_kl_estimate)",
            lambda _: f"got {value.item()}",
        )
    elif isinstance(kl, bool) or not isinstance(kl, numbers.Real):
        raise TypeError(f"kl must be a number or a scalar tensor, got {type(kl).__name__}")
    else:
        check_non_negative("kl", float(kl))


def check_desirable(desirable, layout: TokenLayout) -> None:
    """One bool flag per sequence (True: desirable, False: undesirable)."""
    layout.check_inputs(per_sequence={"desirable": desirable})
    if desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a bool tensor (True: desirable, False: undesirable), got {desirable.dtype}")


def kto_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    desirable: torch.Tensor,
    ref_logp: torch.Tensor,
    kl: float | torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_mask: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    num_items: int | torch.Tensor | None = None,
    head: HeadSpec | None = None,
    **head_options,
) -> LossOutput:
    """KTO, as TRL's ``KTOTrainer`` with ``loss_type="kto"``: with ``r_i = S_i - R_i`` the summed policy minus
    reference log-prob of sequence i's loss tokens and ``z`` the KL reference point,

    - desirable i: ``L_i = desirable_weight * (1 - sigmoid(beta * (r_i - z)))``;
    - undesirable i: ``L_i = undesirable_weight * (1 - sigmoid(beta * (z - r_i)))``;

    and the loss is the mean of ``L_i`` over every sequence of the batch (TRL concatenates the two groups' losses
    and takes their mean), or their sum over the global ``num_items`` sequences for gradient accumulation.

    ``desirable``: bool [num_sequences]. ``ref_logp``: the reference policy's log-probs, per token or per-sequence
    sums (see ``sequence_logps``). ``kl``: ``z``, a number or scalar tensor >= 0, detached; TRL's "kto" always
    estimates it from mismatched prompt/completion pairs (see :func:`kto_kl_estimate`); None (the default) is
    ``z = 0``, TRL's reference point only when it skips the estimate (its "apo_zero_unpaired" loss). Defaults
    ``beta = 0.1``, both weights 1.0, as TRL's. A sequence with no loss token has ``r = 0`` and no gradient.

    Metrics: ``kl`` (the z used), ``reward_chosen`` and ``reward_rejected`` (means of ``beta * r_i`` over the
    desirable and the undesirable sequences; 0 for a group with none; TRL's margin is their difference),
    ``reward_accuracy`` (the fraction of sequences with a loss token on their label's side of z: ``r_i > z`` for
    a desirable one, ``r_i < z`` for an undesirable one), ``preference_loss`` (the loss).
    """
    check_kto_options(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    check_num_items(num_items)
    check_kl(kl)
    if ref_logp is None:
        raise ValueError("ref_logp is required (per token, or per-sequence sums from sequence_logps)")

    def loss_of_batch(batch: TokenBatch) -> LossOutput:
        policy, reference = policy_and_reference_sums(batch, ref_logp)
        log_ratio = policy - reference
        reference_point = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
        if kl is not None:
            reference_point = torch.as_tensor(kl).detach().to(reference_point).reshape(())
        margins = beta * torch.where(desirable, log_ratio - reference_point, reference_point - log_ratio)
        weights = torch.where(desirable, desirable_weight, undesirable_weight).to(log_ratio.dtype)
        losses = weights * torch.sigmoid(-margins)  # 1 - sigmoid(m)
        loss = divide_by_count(losses.sum(), mean_count(batch.num_sequences, num_items))

        rewards = beta * log_ratio.detach()
        desirable_count, undesirable_count = desirable.sum(), (~desirable).sum()
        chosen = divide_by_count(torch.where(desirable, rewards, 0.0).sum(), desirable_count)
        rejected = divide_by_count(torch.where(desirable, 0.0, rewards).sum(), undesirable_count)
        has_tokens = batch.seq_tokens() > 0
        metrics = {
            "preference_loss": loss.detach(),
            "kl": reference_point.detach(),
            "reward_chosen": chosen,
            "reward_rejected": rejected,
            # the sequences on their label's side of the reference point, among those with a loss token
            "reward_accuracy": divide_by_count(((margins.detach() > 0) & has_tokens).sum(), has_tokens.sum()),
        }
        return LossOutput(loss, metrics)

    head = HeadSpec.resolve(head, head_options)
    layout = TokenLayout.read(
        targets, head, loss_mask=loss_mask, sequence_ids=sequence_ids, num_sequences=num_sequences
    )
    if layout.seq_index is None:
        raise ValueError("kto_loss needs sequences: pass targets of shape [B, T] or sequence_ids with num_sequences")
    check_desirable(desirable, layout)
    return evaluate_objective(
        loss_of_batch, hidden, weight, bias, layout, head=head, plan=KTO.gradient_plan(), inputs=(ref_logp,)
    )


KTOLoss = objective_module("KTOLoss", kto_loss, check_kto_options)


@torch.no_grad()
def kto_kl_estimate(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_logp: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    head: HeadSpec | None = None,
    **head_options,
) -> torch.Tensor:
    """The KL reference point ``z`` of :func:`kto_loss`, as TRL estimates it: the mean over the batch's mismatched
    sequences (each prompt with another example's completion) of ``S_i - R_i``, clamped at 0, detached, through the
    fused kernel under no_grad.

    Give it the policy's hidden states on the mismatched sequences and the reference's log-probs on the same
    tokens (per token, or per-sequence sums from ``sequence_logps`` on the reference's hidden states). Under data
    parallelism TRL averages the ranks' means before clamping: all-reduce the per-sequence ``S - R`` means, then
    clamp, rather than averaging this function's clamped values.
    """
    head = HeadSpec.resolve(head, head_options)
    layout = TokenLayout.read(
        targets, head, loss_mask=loss_mask, sequence_ids=sequence_ids, num_sequences=num_sequences
    )
    if layout.seq_index is None:
        raise ValueError(
            "kto_kl_estimate needs sequences: pass targets of shape [B, T] or sequence_ids with num_sequences"
        )
    batch = evaluate_head(hidden, weight, bias, layout, head=head)
    policy, reference = policy_and_reference_sums(batch, ref_logp)
    return (policy - reference).mean().clamp(min=0)


# a sum of terms each depending on one sequence's tokens (the KL reference point is a detached input)
KTO = register(
    Objective(
        name="kto",
        loss=kto_loss,
        data="unpaired",
        batch_inputs=("desirable", "ref_logp", "kl"),
        normalisers={"num_items": "sequences"},
        options=lambda config, step: {
            "beta": config.objective.beta or 0.1,
            "desirable_weight": config.objective.desirable_weight,
            "undesirable_weight": config.objective.undesirable_weight,
        },
        needs_reference=lambda config: True,
        gradient="sequence",
        metric_counts={
            "preference_loss": "sum",
            "kl": "constant",
            "reward_chosen": "desirable_sequences",
            "reward_rejected": "undesirable_sequences",
            "reward_accuracy": "sequences",
        },
    )
)

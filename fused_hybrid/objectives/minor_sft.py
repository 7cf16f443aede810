"""MinorSFT (docs/objectives.md, "MinorSFT"): SFT with a DPO-style brake toward a frozen reference policy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_positive
from ..engine.head import HeadSpec
from ..reduction import check_num_items, divide_by_count, mean_count
from .preference import policy_and_reference_sums
from .registry import Objective, register
from .tokens import LossOutput, TokenBatch, TokenLayout, evaluate_objective, objective_module


def check_minor_sft_options(*, beta: float, length_normalized: bool) -> None:
    check_positive("beta", beta)


def minor_sft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_logp: torch.Tensor,
    beta: float = 0.1,
    length_normalized: bool = False,
    loss_mask: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    num_items: int | torch.Tensor | None = None,
    head: HeadSpec | None = None,
    **head_options,
) -> LossOutput:
    """Per sequence i with m_i response tokens and ``Delta_i = sum_t (logp_t - ref_logp_t)``:

    ``L_i = -(2 / (beta * m_i)) * log sigmoid(beta * Delta_i)``, so
    ``dL_i/dlogp_t = -(2 / m_i) sigmoid(-beta Delta_i)``: the length-normalised SFT gradient at the start
    (Delta = 0), shrinking as the policy leaves the reference.
    With ``length_normalized=True``, ``Delta_i`` is divided by m_i and ``L_i = -(2 / beta) log sigmoid(beta
    Delta_i)``, which keeps that per-token gradient. The loss is the mean of L_i over the sequences with response
    tokens (or over ``num_items`` sequences).

    ``ref_logp``: the reference policy's log-probs, per token or as per-sequence sums (see ``sequence_logps``).
    Metrics: ``m_theta = mean_i (1/m_i) sum_t (logp_t - ref_logp_t)`` and ``sft_loss`` (token-mean NLL).
    """
    check_minor_sft_options(beta=beta, length_normalized=length_normalized)
    check_num_items(num_items)
    if ref_logp is None:
        raise ValueError("ref_logp is required (per token, or per-sequence sums from sequence_logps)")

    def loss_of_batch(batch: TokenBatch) -> LossOutput:
        batch.require_sequences("minor_sft_loss")
        policy, reference = policy_and_reference_sums(batch, ref_logp)
        tokens = batch.seq_tokens()
        has_tokens = tokens > 0
        lengths = tokens.clamp(min=1)
        delta = policy - reference
        if length_normalized:
            losses = -(2.0 / beta) * F.logsigmoid(beta * delta / lengths)
        else:
            losses = -(2.0 / (beta * lengths)) * F.logsigmoid(beta * delta)
        num_seqs = mean_count(has_tokens.sum(), num_items)
        loss = divide_by_count(torch.where(has_tokens, losses, 0.0).sum(), num_seqs)
        metrics = {
            "m_theta": divide_by_count(torch.where(has_tokens, delta.detach() / lengths, 0.0).sum(), has_tokens.sum()),
            "sft_loss": batch.token_mean(-batch.logp),
        }
        return LossOutput(loss, metrics)

    head = HeadSpec.resolve(head, head_options)
    layout = TokenLayout.read(
        targets, head, loss_mask=loss_mask, sequence_ids=sequence_ids, num_sequences=num_sequences
    )
    plan = MINOR_SFT.gradient_plan()
    return evaluate_objective(loss_of_batch, hidden, weight, bias, layout, head=head, plan=plan, inputs=(ref_logp,))


MinorSFTLoss = objective_module("MinorSFTLoss", minor_sft_loss, check_minor_sft_options)


# a sum of terms each depending on one sequence's tokens
MINOR_SFT = register(
    Objective(
        name="minor_sft",
        loss=minor_sft_loss,
        data="demonstrations",
        normalisers={"num_items": "sequences"},
        batch_inputs=("ref_logp",),
        options=lambda config, step: {"beta": config.objective.beta or 0.1},
        needs_reference=lambda config: True,
        gradient="sequence",
        metric_counts={"m_theta": "sequences", "sft_loss": "tokens"},
    )
)

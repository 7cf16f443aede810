"""DFT, Dynamic Fine-Tuning (docs/objectives.md, "DFT"): token NLL weighted by the detached token probability."""

from __future__ import annotations

import torch

from ..engine.head import HeadSpec
from ..reduction import check_num_items, check_reduction, reduce_per_token
from .registry import Objective, register
from .tokens import LossOutput, TokenBatch, TokenLayout, evaluate_objective, objective_module


def check_dft_options(*, reduction: str) -> None:
    check_reduction(reduction)


def dft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    loss_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
    head: HeadSpec | None = None,
    **head_options,
) -> LossOutput:
    """``L = -(1/N_tok) sum_t m_t * sg(p_t) * logp_t``; ``dL/dlogp_t = -m_t * p_t / N_tok``.

    ``reduction`` is ``"mean"`` (over loss tokens, or over ``num_items`` when given), ``"sum"`` or ``"none"``
    (per-token losses with the shape of ``targets``). Metrics: ``sft_loss`` (the plain token-mean NLL) and
    ``mean_prob`` (mean target probability).
    """
    check_dft_options(reduction=reduction)
    check_num_items(num_items, reduction)

    def loss_of_batch(batch: TokenBatch) -> LossOutput:
        prob = batch.logp.detach().exp()
        per_token = batch.keep(-prob * batch.logp)
        metrics = {"sft_loss": batch.token_mean(-batch.logp), "mean_prob": batch.token_mean(prob)}
        loss = reduce_per_token(per_token, batch.mask, reduction, num_items)
        return LossOutput(loss.reshape(batch.shape) if reduction == "none" else loss, metrics)

    head = HeadSpec.resolve(head, head_options)
    layout = TokenLayout.read(targets, head, loss_mask=loss_mask)
    plan = DFT.gradient_plan(reduction=reduction)
    return evaluate_objective(loss_of_batch, hidden, weight, bias, layout, head=head, plan=plan)


DFTLoss = objective_module("DFTLoss", dft_loss, check_dft_options)


DFT = register(
    Objective(
        name="dft",
        loss=dft_loss,
        data="demonstrations",
        normalisers={"num_items": "tokens"},
        # a scalar reduction is token-separable; reduction="none" leaves the downstream use open
        gradient=lambda *, reduction: "two-pass" if reduction == "none" else "token",
        metric_counts={"sft_loss": "tokens", "mean_prob": "tokens"},
    )
)

"""IFT, Intuitive Fine-Tuning (docs/objectives.md, "IFT"): the loss part, NLL with gamma-propagated token weights.

IFT credits each response position t with the discounted NLL of everything it leads to,
``G_t = sum_{k >= t} gamma^(k-t) * (-logp_k)``. Summed over t, token k is counted with weight
``c_k = sum_{j=0}^{r_k} gamma^j`` (r_k: its 0-based position in the response), so later tokens, which close
more of those returns, weigh more. The weights are rescaled to sum to the response length L_i, and
``L_IFT = mean_i (1/L_i) sum_k w_k * (-logp_k)``; gamma = 0 gives w = 1, plain SFT (mean over sequences of the
token-mean NLL). The input-embedding mixing of IFT belongs to the model inputs (the trainer), not to this loss.
"""

from __future__ import annotations

import torch

from ..checks import check_non_negative
from ..engine.head import HeadSpec
from ..reduction import check_num_items, divide_by_count, mean_count
from .registry import Objective, register
from .tokens import LossOutput, TokenBatch, TokenLayout, evaluate_objective, objective_module


def ift_token_weights(batch: TokenBatch, gamma: float) -> torch.Tensor:
    """w_k = c_k * L_i / sum_seq c with c_k = sum_{j=0}^{r_k} gamma^j = (1 - gamma^(r_k + 1)) / (1 - gamma)."""
    rank = batch.token_rank()
    if gamma == 1.0:
        propagated = rank + 1.0
    else:
        propagated = (1.0 - gamma ** (rank + 1.0)) / (1.0 - gamma)
    propagated = batch.keep(propagated)
    scale = batch.seq_tokens() / batch.seq_sum(propagated).clamp(min=torch.finfo(propagated.dtype).tiny)
    return propagated * batch.to_tokens(scale)


def check_ift_options(*, gamma: float) -> None:
    check_non_negative("gamma", gamma)
    if gamma > 1:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")


def ift_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    gamma: float = 0.95,
    loss_mask: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    num_items: int | torch.Tensor | None = None,
    head: HeadSpec | None = None,
    **head_options,
) -> LossOutput:
    """IFT loss (see the module docstring): mean over sequences with response tokens (or over ``num_items``
    sequences) of the gamma-weighted token-mean NLL. Metrics: ``sft_loss`` (plain token-mean NLL)."""
    check_ift_options(gamma=gamma)
    check_num_items(num_items)

    def loss_of_batch(batch: TokenBatch) -> LossOutput:
        batch.require_sequences("ift_loss")
        weights = ift_token_weights(batch, gamma)
        tokens = batch.seq_tokens()
        per_sequence = batch.seq_sum(-weights * batch.logp) / tokens.clamp(min=1)
        num_seqs = mean_count((tokens > 0).sum(), num_items)
        loss = divide_by_count(per_sequence.sum(), num_seqs)
        return LossOutput(loss, {"sft_loss": batch.token_mean(-batch.logp)})

    head = HeadSpec.resolve(head, head_options)
    layout = TokenLayout.read(
        targets, head, loss_mask=loss_mask, sequence_ids=sequence_ids, num_sequences=num_sequences
    )
    plan = IFT.gradient_plan()
    return evaluate_objective(loss_of_batch, hidden, weight, bias, layout, head=head, plan=plan)


IFTLoss = objective_module("IFTLoss", ift_loss, check_ift_options)


IFT = register(
    Objective(
        name="ift",
        loss=ift_loss,
        data="demonstrations",
        normalisers={"num_items": "sequences"},
        options=lambda config, step: {"gamma": config.objective.gamma},
        input_mixing=True,
        metric_counts={"sft_loss": "tokens"},
    )
)

"""SFT (docs/objectives.md, "Cross-entropy and SFT"): the token-mean cross-entropy of the demonstrations, as an
objective."""

from __future__ import annotations

import torch

from ..cross_entropy import cross_entropy_of_head
from ..engine.head import HeadSpec
from .registry import Objective, register
from .tokens import LossOutput


def sft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    num_items: int | torch.Tensor | None = None,
    head: HeadSpec | None = None,
    **head_options,
) -> LossOutput:
    """:func:`fused_hybrid.linear_cross_entropy` (mean over the labelled tokens, or over ``num_items``) as a
    LossOutput with no metrics."""
    loss = cross_entropy_of_head(
        hidden, weight, targets, bias, head=HeadSpec.resolve(head, head_options), num_items=num_items
    )
    return LossOutput(loss, {})


register(Objective(name="sft", loss=sft_loss, data="demonstrations", normalisers={"num_items": "tokens"}))

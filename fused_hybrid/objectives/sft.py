"""SFT (docs/objectives.md, "Cross-entropy and SFT"): the token-mean cross-entropy of the demonstrations, as an
objective."""

from __future__ import annotations

import torch

from ..cross_entropy import linear_cross_entropy
from ..head_spec import HEAD_OPTIONS, HeadSpec
from ._tokens import LossOutput
from .registry import Objective, register


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
    spec = HeadSpec.resolve(head, head_options)
    options = {name: getattr(spec, name) for name in HEAD_OPTIONS}
    return LossOutput(linear_cross_entropy(hidden, weight, targets, bias, num_items=num_items, **options), {})


register(Objective(name="sft", loss=sft_loss, data="demonstrations", normalisers={"num_items": "tokens"}))

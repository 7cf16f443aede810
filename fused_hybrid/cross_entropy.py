"""Drop-in fused linear cross-entropy, matching ``F.cross_entropy(F.linear(hidden, weight, bias), targets, ...)``."""

from __future__ import annotations

import torch
from torch import nn

from .checks import check_non_negative, check_tensor
from .engine.core import IGNORE_INDEX, HeadStats
from .engine.entry import linear_head_loss
from .engine.head import HeadSpec, VocabParallel
from .reduction import check_num_items, check_reduction, mean_count, reduce_per_token


def check_cross_entropy_options(reduction: str, label_smoothing: float, z_loss: float) -> None:
    """The loss's own options, checked by the function and when the module is built."""
    check_reduction(reduction)
    check_non_negative("label_smoothing", label_smoothing)
    if label_smoothing > 1:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    check_non_negative("z_loss", z_loss)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    num_items: int | torch.Tensor | None = None,
    backend: str = "auto",
    workspace_bytes: int | None = None,
    gradient_filter: float | None = None,
    vocab_parallel: VocabParallel | None = None,
) -> torch.Tensor:
    """Cross-entropy of the LM head ``softcap(F.linear(hidden, weight, bias) / temperature)``
    (docs/objectives.md, "Cross-entropy and SFT").

    Per token: ``(1 - eps) * (-logp) + eps * (lse - mean_v z_v) + z_loss * lse**2`` (eps = ``label_smoothing``),
    0 at ignored tokens. ``reduction="mean"`` divides the sum by the number of non-ignored tokens, or by
    ``num_items`` when given (a global count for gradient accumulation across micro-batches and ranks); an
    all-ignored batch gives 0 with zero gradients. ``reduction="none"`` returns the per-token losses with the
    shape of ``targets``.
    """
    head = HeadSpec(
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        backend=backend,
        workspace_bytes=workspace_bytes,
        gradient_filter=gradient_filter,
        vocab_parallel=vocab_parallel,
    )
    return cross_entropy_of_head(
        hidden,
        weight,
        targets,
        bias,
        head=head,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        num_items=num_items,
    )


def cross_entropy_of_head(
    hidden,
    weight,
    targets,
    bias=None,
    *,
    head: HeadSpec,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    num_items=None,
) -> torch.Tensor:
    """:func:`linear_cross_entropy` with the head given as a HeadSpec (what the SFT objective and the module use)."""
    check_cross_entropy_options(reduction, label_smoothing, z_loss)
    check_num_items(num_items, reduction)
    for name, value in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        check_tensor(name, value)  # read below before the engine checks the rest
    check_tensor("bias", bias, optional=True)
    # mean_v z_v is over the whole vocabulary, every slice of it under vocab parallelism
    parallel = head.vocab_parallel
    vocab_size = weight.shape[0] if parallel is None else parallel.layout(weight.shape[0], weight.device)[1]
    valid = targets != head.ignore_index
    mean_count(valid.sum(), num_items)  # a global count of 0 with loss tokens, refused before the kernels

    def loss_of_stats(stats: HeadStats):
        per_token = -stats.logp
        if label_smoothing > 0:
            per_token = (1.0 - label_smoothing) * per_token + label_smoothing * (stats.lse - stats.sum_z / vocab_size)
        if z_loss > 0:
            per_token = per_token + z_loss * stats.lse.square()  # stats are 0 at ignored tokens
        return reduce_per_token(per_token, valid, reduction, num_items), None

    # every scalar reduction is a sum of per-token terms over mask-given counts: the gradient can come with the
    # forward; reduction="none" leaves the downstream use open (two passes)
    loss, _ = linear_head_loss(loss_of_stats, hidden, weight, targets, bias, head=head, separable=reduction != "none")
    return loss


class FusedLinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`linear_cross_entropy`; call it as ``loss_fn(hidden, weight, targets, bias=None)``."""

    def __init__(
        self,
        *,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        temperature: float = 1.0,
        backend: str = "auto",
        workspace_bytes: int | None = None,
        gradient_filter: float | None = None,
        vocab_parallel: VocabParallel | None = None,
    ) -> None:
        super().__init__()
        # every option is checked now, not at the first forward
        check_cross_entropy_options(reduction, label_smoothing, z_loss)
        self.head = HeadSpec(
            temperature=temperature,
            softcap=softcap,
            ignore_index=ignore_index,
            backend=backend,
            workspace_bytes=workspace_bytes,
            gradient_filter=gradient_filter,
            vocab_parallel=vocab_parallel,
        )
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        num_items: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return cross_entropy_of_head(
            hidden,
            weight,
            targets,
            bias,
            head=self.head,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            num_items=num_items,
        )

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
            f"head={self.head}"
        )

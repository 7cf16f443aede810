"""The validated entry to the logits-free core: checks the arguments, then runs the custom op (or the
vocab-parallel path, or the naive reference) and masks ignored tokens' statistics to 0."""

from __future__ import annotations

import torch

from ._ops import token_statistics
from ._validation import check_head_inputs, check_targets_in_range, resolve_backend
from .backends import reference
from .core import HeadStats, LogitTransform
from .head_spec import HeadSpec
from .vocab_parallel import vocab_parallel_head_stats


def linear_head_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    head: HeadSpec | None = None,
    **head_options,
) -> HeadStats:
    """Validated entry to the core: returns HeadStats with the leading shape of `targets`.

    ``head`` (a :class:`fused_hybrid.HeadSpec`) and / or its fields as keywords (``temperature``, ``softcap``,
    ``ignore_index``, ``backend``, ``vocab_parallel``) say how the logits are formed and computed. With
    ``vocab_parallel``, `weight` and `bias` are this rank's slice of the head and the statistics are those of the
    full vocabulary (see fused_hybrid.vocab_parallel).
    """
    head = HeadSpec.resolve(head, head_options)
    check_head_inputs(hidden, weight, targets, bias)
    resolved = resolve_backend(head.backend, hidden)
    vocab_parallel, ignore_index = head.vocab_parallel, head.ignore_index
    offset, vocab_size = 0, weight.shape[0]
    if vocab_parallel is not None:
        if resolved == "reference":
            raise ValueError("vocab_parallel runs on the logits-free backends, not on 'reference'")
        offset, vocab_size = vocab_parallel.layout(weight.shape[0], weight.device)
    check_targets_in_range(targets, vocab_size, ignore_index)

    leading_shape = targets.shape
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    targets_1d = targets.reshape(-1).to(torch.int64).contiguous()
    transform = LogitTransform(temperature=float(head.temperature), softcap=head.softcap, ignore_index=ignore_index)

    if resolved == "reference":
        stats = reference.head_stats(hidden_2d, weight, targets_1d, bias, transform)
    elif vocab_parallel is not None:
        stats = vocab_parallel_head_stats(hidden_2d, weight, targets_1d, bias, transform, resolved, vocab_parallel,
                                          offset)  # fmt: skip
    else:
        raw = token_statistics(hidden_2d, weight, targets_1d, bias, transform, resolved)
        # Ignored tokens read 0; their gradient coefficients are 0 too (see token_grad_coefficients).
        valid = targets_1d != ignore_index
        stats = HeadStats(*(torch.where(valid, statistic, 0.0) for statistic in raw))
    return HeadStats(*(s.reshape(leading_shape) for s in stats))

"""Reductions shared by every loss: the denominators of means and the caller-given global counts."""

from __future__ import annotations

import math
import numbers

import torch

from .checks import fail_where

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_num_items(num_items, reduction: str = "mean", *, name: str = "num_items") -> None:
    """`num_items` (a global count for gradient accumulation: a whole number >= 0) is a Python or NumPy number or a
    scalar tensor. A tensor's value is checked where it lives: eagerly on the CPU, as a device assertion elsewhere
    (no host sync)."""
    if num_items is None:
        return
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(num_items.shape)}")
        if num_items.dtype == torch.bool or num_items.is_complex():
            raise TypeError(f"{name} must be a count (an integer or float tensor), got a {num_items.dtype} tensor")
        count = num_items.detach().reshape(())
        bad = count < 0
        if count.is_floating_point():
            bad = bad | (count != count.round()) | ~count.isfinite()
        fail_where(
            bad,
            f"{name} must be a whole number >= 0 (a count of tokens, sequences or pairs)",
            lambda _: f"got {count.item()}",
        )
    elif isinstance(num_items, bool) or not isinstance(num_items, numbers.Real):
        raise TypeError(f"{name} must be a number or a scalar tensor, got {type(num_items).__name__}")
    elif not (num_items >= 0 and math.isfinite(num_items) and float(num_items).is_integer()):
        raise ValueError(
            f"{name} must be a whole number >= 0 (a count of tokens, sequences or pairs), got {num_items!r}"
        )
    if reduction != "mean":
        raise ValueError(f"{name} is the denominator of reduction='mean'; got reduction={reduction!r}")


def mean_count(local_count, num_items, *, name: str = "num_items"):
    """The count a mean divides by: the caller's global `num_items` when given, else the batch's own `local_count`
    (of tokens, sequences or pairs). A global count covers every micro-batch and rank, this batch's items among them:
    0 while this batch has items would make the mean a sum, and is refused (an all-ignored batch's 0 stays valid).
    Checked without a host sync on a device (fail_where)."""
    if num_items is None:
        return local_count
    if not isinstance(num_items, torch.Tensor) and num_items != 0:
        return num_items
    if not isinstance(num_items, torch.Tensor):  # a Python 0
        has_items = local_count > 0
        if isinstance(has_items, torch.Tensor):
            fail_where(has_items, f"{name} is 0 {_ZERO_COUNT}")
        elif has_items:
            raise ValueError(f"{name} is 0 {_ZERO_COUNT}")
        return num_items
    zero = num_items.detach().reshape(()) == 0
    if isinstance(local_count, torch.Tensor):
        fail_where(zero.to(local_count.device) & (local_count > 0), f"{name} is 0 {_ZERO_COUNT}")
    elif local_count > 0:
        fail_where(zero, f"{name} is 0 {_ZERO_COUNT}")
    return num_items


_ZERO_COUNT = (
    "while this batch has items to count (a global count includes this batch's; pass the count over every "
    "micro-batch and rank, or leave it out)"
)


def divide_by_count(total: torch.Tensor, count: int | float | torch.Tensor) -> torch.Tensor:
    """total / count, where an empty batch (count 0) gives 0 rather than NaN.

    A Python count stays a Python number (a device tensor made from it would be a blocking host-to-device copy,
    which also breaks CUDA-graph capture); a tensor count is used where it lives, never read on the host."""
    if isinstance(count, torch.Tensor):
        return total / count.to(device=total.device, dtype=total.dtype).clamp(min=1)
    return total / max(float(count), 1.0)  # a NumPy count becomes a Python number


def reduce_per_token(per_token: torch.Tensor, mask: torch.Tensor, reduction: str, num_items=None) -> torch.Tensor:
    """Reduce per-token losses (already 0 outside the mask) by `reduction`; the mean is over `mask` tokens."""
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    return divide_by_count(total, mean_count(mask.sum(), num_items))

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
    return divide_by_count(total, mask.sum() if num_items is None else num_items)

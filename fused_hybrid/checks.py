"""Argument checks shared by every public entry point.

Each check raises before any kernel launches and names the offending argument and what was expected.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value, *, optional: bool = False) -> None:
    """TypeError unless `value` is a tensor (or None with `optional`), naming `name`; a module given where its
    parameter is meant (``model.lm_head`` for ``model.lm_head.weight``) is told which attribute to pass."""
    if isinstance(value, torch.Tensor) or (optional and value is None):
        return
    expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
    hint = ""
    if isinstance(value, torch.nn.Module):
        has = [
            attribute for attribute in ("weight", "bias") if isinstance(getattr(value, attribute, None), torch.Tensor)
        ]
        hint = f" (a module: pass its {' / '.join('.' + a for a in has)} tensor)" if has else " (a module)"
    raise TypeError(f"{name} must be {expected}, got {type(value).__name__}{hint}")


def check_head_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
) -> None:
    """Validate `(hidden [..., D], weight [V, D], targets [...], bias [V])` (HeadSpec checks the transform)."""
    for name, value in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        check_tensor(name, value)
    check_tensor("bias", bias, optional=True)

    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., D] (at least 1 dimension), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, D] (2 dimensions), got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1]}) must equal weight's D = weight.shape[1] "
            f"({weight.shape[1]}); hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must have V > 0 and D > 0, got shape {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (int64 or int32), got {targets.dtype}")

    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype ({weight.dtype}) must match hidden dtype ({hidden.dtype}); cast one of them")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype ({bias.dtype}) must match hidden dtype ({hidden.dtype})")

    devices = {("hidden", hidden.device), ("weight", weight.device), ("targets", targets.device)}
    if bias is not None:
        devices.add(("bias", bias.device))
    if len({device for _, device in devices}) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in sorted(devices, key=str))
        raise ValueError(f"hidden, weight, targets and bias must be on one device, got {listed}")


def check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_non_negative(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def fail_where(bad: torch.Tensor, message: str, found=None) -> None:
    """Raise if any element of the bool tensor `bad` is set, without a host-device synchronisation on a device.

    On the CPU this is an eager `ValueError` (`found(bad)` adds the first offending value). On an accelerator,
    and inside `torch.compile`, it is an asynchronous device assertion: no sync, no graph break; the kernels never
    index memory by these values, so a bad one cannot read out of bounds before the assertion fires.
    """
    if bad.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            raise ValueError(message if found is None else f"{message}; {found(bad)}")
    else:
        torch._assert_async(~bad.any(), message)


def check_targets_in_range(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Fail clearly on a target outside [0, V) that is not `ignore_index`."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    fail_where(
        bad,
        f"targets must lie in [0, V) = [0, {vocab_size}) or equal ignore_index ({ignore_index})",
        lambda bad: f"found {targets[bad][0].item()}",
    )


def check_sequence_ids(sequence_ids: torch.Tensor, num_sequences: int) -> None:
    """Packed `sequence_ids` [N] lie in [0, num_sequences) and never decrease: each sequence is one contiguous
    run of tokens and the sequences come in ascending order (the per-sequence sums and token ranks rely on it)."""
    fail_where(
        (sequence_ids < 0) | (sequence_ids >= num_sequences),
        f"sequence_ids must lie in [0, num_sequences) = [0, {num_sequences})",
        lambda bad: f"found {sequence_ids[bad][0].item()}",
    )
    following, preceding = sequence_ids[1:], sequence_ids[:-1]
    fail_where(
        following < preceding,
        "sequence_ids must be non-decreasing (each packed sequence one contiguous run of tokens, the "
        "sequences in ascending order)",
        lambda bad: f"id {following[bad][0].item()} follows id {preceding[bad][0].item()}",
    )

"""Argument checks shared by every public entry point.

Each check raises before any kernel launches and names the offending argument and what was expected.
"""

from __future__ import annotations

import functools
import json
import os
from importlib import resources

import torch

from .backends import LOGITS_FREE_BACKENDS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_head_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
) -> None:
    """Validate `(hidden [..., D], weight [V, D], targets [...], bias [V])` (HeadSpec checks the transform)."""
    for name, value in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")

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


def check_backend_name(backend: str) -> None:
    names = ("auto", *LOGITS_FREE_BACKENDS, "reference")
    if backend not in names:
        raise ValueError(f"backend must be one of {names}, got {backend!r}")


def resolve_backend(backend: str, hidden: torch.Tensor) -> str:
    """Map `backend` to a registered backend or "reference", checking it can run on `hidden`."""
    check_backend_name(backend)
    if backend == "auto":
        num_tokens = hidden.numel() // max(hidden.shape[-1], 1)
        chosen = auto_backend(hidden.device.type, hidden.dtype, num_tokens)
        runs_triton = hidden.device.type == "cuda" and hidden.dtype in TRITON_DTYPES and triton_import_error() is None
        return chosen if chosen != "triton" or runs_triton else "chunked"
    if backend == "triton":
        error = triton_import_error()
        if error is not None:
            raise ValueError(f"backend='triton' needs the triton package, which failed to import: {error}")
        if hidden.device.type != "cuda" and not triton_interpreter_enabled():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {hidden.device}), or TRITON_INTERPRET=1 "
                "to run the kernels on the CPU through the Triton interpreter"
            )
        if hidden.dtype not in TRITON_DTYPES:
            raise TypeError(
                f"backend='triton' takes float16, bfloat16 or float32 hidden/weight, got {hidden.dtype}; "
                "use backend='torch' for float64"
            )
    return backend


@functools.cache
def _dispatch_table() -> dict:
    return json.loads(resources.files("fused_hybrid.backends").joinpath("dispatch_table.json").read_text())


def auto_backend(device_type: str, dtype: torch.dtype, num_tokens: int) -> str:
    """The backend that backend="auto" runs: the first rule of the measured table (backends/dispatch_table.json)
    matching the device type, the dtype and the number of tokens."""
    table = _dispatch_table()
    dtype_name = str(dtype).removeprefix("torch.")
    for rule in table["rules"]:
        if rule["device"] == device_type and dtype_name in rule.get("dtypes", [dtype_name]) \
                and num_tokens >= rule["min_tokens"]:  # fmt: skip
            return rule["backend"]
    return table["otherwise"]


def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return str(error)
    return None


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
    fail_where(bad, f"targets must lie in [0, V) = [0, {vocab_size}) or equal ignore_index ({ignore_index})",
               lambda bad: f"found {targets[bad][0].item()}")  # fmt: skip


def check_sequence_ids(sequence_ids: torch.Tensor, num_sequences: int) -> None:
    """Packed `sequence_ids` [N] lie in [0, num_sequences) and never decrease: each sequence is one contiguous
    run of tokens and the sequences come in ascending order (the per-sequence sums and token ranks rely on it)."""
    fail_where((sequence_ids < 0) | (sequence_ids >= num_sequences),
               f"sequence_ids must lie in [0, num_sequences) = [0, {num_sequences})",
               lambda bad: f"found {sequence_ids[bad][0].item()}")  # fmt: skip
    following, preceding = sequence_ids[1:], sequence_ids[:-1]
    fail_where(following < preceding,
               "sequence_ids must be non-decreasing (each packed sequence one contiguous run of tokens, the "
               "sequences in ascending order)",
               lambda bad: f"id {following[bad][0].item()} follows id {preceding[bad][0].item()}")  # fmt: skip

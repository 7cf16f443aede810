"""Which engine runs a pass: the backend registry, `backend="auto"`'s measured table, the deterministic fallback and
the chunked engine's epilogue. Every choice of backend is made here.

A logits-free backend is a module (or any object) providing

    partials(hidden [N, D], weight [V, D], targets [N], bias, head) -> VocabPartials
    backward(hidden, weight, targets, bias, norm, coefs, head, needs) -> (d_hidden, d_weight, d_bias)
    DETERMINISTIC_BACKWARD: bool   (run-to-run identical gradients)

driven by the custom op (`engine.custom_op`), which finalises and masks the statistics: a backend may leave
ignored tokens' sums unspecified (the Triton kernels skip blocks of ignored tokens altogether), and its backward
receives all-zero coefficients for them. `head` is the HeadSpec (temperature, softcap, ignore_index,
workspace_bytes, gradient_filter). `norm` (core.SoftmaxNorm) is each token's max logit m and log s,
s = sum exp(z - m), over the full vocabulary: a backward forms log p = (z - m) - log s, never z - lse. A target
outside [0, V) of this weight (on another vocab-parallel shard) contributes no target logit and no one-hot
gradient here.

The built-in backends: "chunked" (engine.chunked: cuBLAS GEMMs per token chunk and a fused epilogue, Triton's on
CUDA, PyTorch's elsewhere), "torch" (the same engine with the PyTorch epilogue everywhere: any dtype,
deterministic) and "triton" (the tile kernels of fused_hybrid.kernels: O(N) memory). "reference" is not one of
them: it builds the full logits and relies on plain autograd (engine.reference), for tests and as the naive
baseline.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from collections.abc import Callable
from importlib import resources
from types import ModuleType, SimpleNamespace

import torch

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The backend whose backward is deterministic, for torch.use_deterministic_algorithms(True).
DETERMINISTIC_FALLBACK = "torch"


def _chunked_engine() -> ModuleType:
    from . import chunked

    return chunked


def _torch_epilogue_engine() -> SimpleNamespace:
    from . import chunked, torch_epilogue

    return SimpleNamespace(
        partials=functools.partial(chunked.partials, epilogue=torch_epilogue),
        backward=functools.partial(chunked.backward, epilogue=torch_epilogue),
        DETERMINISTIC_BACKWARD=True,
    )


def _tile_kernels() -> SimpleNamespace:
    from ..kernels import token_statistics_backward, token_statistics_forward

    return SimpleNamespace(
        partials=token_statistics_forward.vocabulary_partials,
        backward=token_statistics_backward.tile_backward,
        DETERMINISTIC_BACKWARD=False,  # fp32 atomics: the order of the additions varies run to run
    )


# name -> loader of the backend, called on first use (so that a CPU-only run never imports Triton)
LOGITS_FREE_BACKENDS: dict[str, Callable[[], object]] = {
    "chunked": _chunked_engine,
    "torch": functools.cache(_torch_epilogue_engine),
    "triton": functools.cache(_tile_kernels),
}


def register_backend(name: str, module_path: str) -> None:
    """Make a logits-free backend available under `name` (an absolute module path, or relative to this package)."""
    LOGITS_FREE_BACKENDS[name] = functools.partial(importlib.import_module, module_path, __package__)


def logits_free_backend(name: str):
    """The backend registered as `name`; an unknown name is an error, never another backend."""
    if name not in LOGITS_FREE_BACKENDS:
        raise ValueError(f"no logits-free backend named {name!r}; registered: {sorted(LOGITS_FREE_BACKENDS)}")
    return LOGITS_FREE_BACKENDS[name]()


def backward_backend(name: str):
    """The backend that runs the backward of a forward computed by `name`: itself, or under
    torch.use_deterministic_algorithms(True) the deterministic fallback when its own backward is not (the Triton
    backward accumulates with atomics, whose order varies run to run; set CUBLAS_WORKSPACE_CONFIG on CUDA as
    PyTorch's deterministic mode asks)."""
    backend = logits_free_backend(name)
    if torch.are_deterministic_algorithms_enabled() and not backend.DETERMINISTIC_BACKWARD:
        return logits_free_backend(DETERMINISTIC_FALLBACK)
    return backend


def check_backend_name(backend: str) -> None:
    names = ("auto", *LOGITS_FREE_BACKENDS, "reference")
    if backend not in names:
        raise ValueError(f"backend must be one of {names}, got {backend!r}")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return str(error)
    return None


def resolve_backend(backend: str, hidden: torch.Tensor) -> str:
    """Map `backend` to a registered backend or "reference", checking it can run on `hidden`."""
    check_backend_name(backend)
    if backend == "auto":
        num_tokens = hidden.numel() // max(hidden.shape[-1], 1)
        chosen = auto_backend(hidden.device.type, hidden.dtype, num_tokens)
        return chosen if chosen != "triton" or triton_runs_on(hidden) else "chunked"
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
    return json.loads(resources.files(__package__).joinpath("dispatch_table.json").read_text())


def auto_backend(device_type: str, dtype: torch.dtype, num_tokens: int) -> str:
    """The backend that backend="auto" runs: the first rule of the measured table (engine/dispatch_table.json,
    written by the benchmarks) matching the device type, the dtype and the number of tokens."""
    table = _dispatch_table()
    dtype_name = str(dtype).removeprefix("torch.")
    for rule in table["rules"]:
        matches_dtype = dtype_name in rule.get("dtypes", [dtype_name])
        if rule["device"] == device_type and matches_dtype and num_tokens >= rule["min_tokens"]:
            return rule["backend"]
    return table["otherwise"]


def triton_runs_on(hidden: torch.Tensor) -> bool:
    """Whether the Triton kernels run compiled on `hidden`: CUDA tensors of their dtypes, Triton importing."""
    return hidden.device.type == "cuda" and hidden.dtype in TRITON_DTYPES and triton_import_error() is None


def default_epilogue(hidden: torch.Tensor):
    """The chunked engine's epilogue: Triton's for CUDA tensors of the kernels' dtypes (when Triton imports),
    PyTorch's otherwise."""
    if triton_runs_on(hidden):
        from ..kernels import logit_epilogue

        return logit_epilogue
    from . import torch_epilogue

    return torch_epilogue


def default_divergence_epilogue(hidden: torch.Tensor, teacher):
    """The divergence engine's epilogue: Triton's for two heads on CUDA (the kernels' dtypes, Triton importing),
    PyTorch's otherwise and for a top-k teacher (engine.divergence.TopKTeacher)."""
    from .divergence import TeacherHead

    if isinstance(teacher, TeacherHead) and triton_runs_on(hidden) and triton_runs_on(teacher.hidden):
        from ..kernels import divergence_epilogue

        return divergence_epilogue
    from . import torch_divergence_epilogue

    return torch_divergence_epilogue

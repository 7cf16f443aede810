"""The logits-free backends, registered by name, and the one place that picks the backend a pass runs on.

A backend is a module providing

    partials(hidden [N, D], weight [V, D], targets [N], bias, transform) -> VocabPartials
    backward(hidden, weight, targets, bias, norm, coefs, transform, needs) -> (d_hidden, d_weight, d_bias)
    DETERMINISTIC_BACKWARD: bool   (run-to-run identical gradients)

driven by the custom ops in `fused_hybrid._ops`, which finalise and mask the statistics: a backend may leave
ignored tokens' sums unspecified (the Triton kernels skip blocks of ignored tokens altogether), and its backward
receives all-zero coefficients for them. `norm` (core.SoftmaxNorm) is each token's max logit m and log s, s = sum
exp(z - m), over the full vocabulary: a backward forms log p = (z - m) - log s, never z - lse (lse's fp32 rounding
would move every p of the row). A target outside [0, V) of this weight (on another vocab-parallel shard)
contributes no target logit and no one-hot gradient here.

The `reference` backend is not one of them: it builds the full logits and relies on plain autograd, for tests and
as the naive baseline (`fused_hybrid.backends.reference`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

# name -> module, imported on first use (so that a CPU-only run never imports Triton)
LOGITS_FREE_BACKENDS = {"chunked": ".chunked", "torch": ".torch_chunked", "triton": ".triton_backend"}
# The backend whose backward is deterministic, for torch.use_deterministic_algorithms(True).
DETERMINISTIC_FALLBACK = "torch"


def register_backend(name: str, module_path: str) -> None:
    """Make a logits-free backend available under `name` (an absolute module path, or relative to this package)."""
    LOGITS_FREE_BACKENDS[name] = module_path


def logits_free_backend(name: str) -> ModuleType:
    """The backend module registered as `name`; an unknown name is an error, never another backend."""
    if name not in LOGITS_FREE_BACKENDS:
        raise ValueError(f"no logits-free backend named {name!r}; registered: {sorted(LOGITS_FREE_BACKENDS)}")
    return importlib.import_module(LOGITS_FREE_BACKENDS[name], __package__)


def backward_backend(name: str) -> ModuleType:
    """The backend that runs the backward of a forward computed by `name`: itself, or under
    torch.use_deterministic_algorithms(True) the deterministic fallback when its own backward is not (the Triton
    backward accumulates with atomics, whose order varies run to run; set CUBLAS_WORKSPACE_CONFIG on CUDA as
    PyTorch's deterministic mode asks)."""
    backend = logits_free_backend(name)
    if torch.are_deterministic_algorithms_enabled() and not backend.DETERMINISTIC_BACKWARD:
        return logits_free_backend(DETERMINISTIC_FALLBACK)
    return backend

"""Independent float64 references written straight from docs/objectives.md, with the full logits and plain
autograd."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logits64(hidden, weight, bias=None, *, temperature=1.0, softcap=None):
    z = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double()) / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def logprobs_entropy64(hidden, weight, targets, bias=None, *, temperature=1.0, softcap=None, ignore_index=-100):
    z = logits64(hidden, weight, bias, temperature=temperature, softcap=softcap)
    log_probs = F.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    logp = log_probs.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def leaf64(t: torch.Tensor | None) -> torch.Tensor | None:
    """A float64 leaf copy of `t` (same values), requiring grad if `t` does."""
    if t is None:
        return None
    return t.detach().double().requires_grad_(t.requires_grad)


def grads(output: torch.Tensor, inputs: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    computed = iter(torch.autograd.grad(output, wanted, allow_unused=True))
    return [next(computed) if t is not None and t.requires_grad else None for t in inputs]


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str = "", atol: float = 0.0
) -> None:
    """max |actual - expected| <= rel * max(max |expected|, 1e-6) + atol: a dtype-appropriate, scale-aware bound.

    `atol` covers results that are tiny through cancellation (a token predicted with p ~ 1 has gradient ~ 1 - p),
    whose error is set by the size of the cancelling terms rather than by the result.
    """
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    error = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-6)
    assert error <= rel * scale + atol, f"{name}: max error {error:.3e} > {rel:.1e} * scale {scale:.3e} + {atol:.1e}"

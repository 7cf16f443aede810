"""The logits-free core as `torch.library` custom ops, so that `torch.compile` traces through the loss without a
graph break: `fused_hybrid::head_stats` (forward) and `fused_hybrid::head_stats_backward`, with fake (meta)
implementations for tracing and the autograd formula of `head_stats.token_grad_coefficients`."""

from __future__ import annotations

import importlib

import torch

from .head_stats import HeadStats, LogitTransform, finalize_partials, stats_dtype, token_grad_coefficients


def backend_module(name: str):
    """The backend implementing `partials` and `backward` ("triton" or "torch")."""
    return importlib.import_module(f".backends.{'triton_backend' if name == 'triton' else 'torch_chunked'}",
                                   __package__)  # fmt: skip


@torch.library.custom_op("fused_hybrid::head_stats", mutates_args=())
def _head_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    transform = LogitTransform(temperature, softcap, ignore_index)
    partials = backend_module(backend).partials(hidden, weight, targets, bias, transform)
    return tuple(s.contiguous() for s in finalize_partials(partials))


@_head_stats.register_fake
def _(hidden, weight, targets, bias, temperature, softcap, ignore_index, backend):
    out = hidden.new_empty(hidden.shape[0], dtype=stats_dtype(hidden.dtype))
    return out, torch.empty_like(out), torch.empty_like(out), torch.empty_like(out)


@torch.library.custom_op("fused_hybrid::head_stats_backward", mutates_args=())
def _head_stats_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    onehot_coef: torch.Tensor,
    prob_coef: torch.Tensor,
    logp_coef: torch.Tensor | None,
    uniform_coef: torch.Tensor | None,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    backend: str,
    needs_hidden: bool,
    needs_weight: bool,
    needs_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden, dweight, dbias); a gradient that is not needed comes back as an empty tensor (no work done)."""
    from .head_stats import TokenGradCoefficients

    coefs = TokenGradCoefficients(onehot_coef, prob_coef, logp_coef, uniform_coef)
    grads = backend_module(backend).backward(
        hidden, weight, targets, bias, lse, coefs, LogitTransform(temperature, softcap, ignore_index),
        needs=(needs_hidden, needs_weight, needs_bias),
    )  # fmt: skip
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@_head_stats_backward.register_fake
def _(hidden, weight, targets, bias, lse, onehot_coef, prob_coef, logp_coef, uniform_coef, temperature, softcap,
      ignore_index, backend, needs_hidden, needs_weight, needs_bias):  # fmt: skip
    # Every backend returns contiguous gradients, whatever the strides of hidden / weight (a transposed view):
    # new_empty(shape) is contiguous where empty_like would copy the input's strides.
    return (
        hidden.new_empty(hidden.shape) if needs_hidden else hidden.new_empty(0),
        weight.new_empty(weight.shape) if needs_weight else hidden.new_empty(0),
        bias.new_empty(bias.shape) if needs_bias else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, temperature, softcap, ignore_index, backend = inputs
    _, entropy, lse, _ = output
    ctx.save_for_backward(hidden, weight, targets, bias, lse, entropy)
    ctx.options = (temperature, softcap, ignore_index, backend)
    # An output nobody used gets None, not a zero tensor, so its term of the backward costs no work.
    ctx.set_materialize_grads(False)


def _backward(ctx, g_logp, g_entropy, g_lse, g_sum_z):
    hidden, weight, targets, bias, lse, entropy = ctx.saved_tensors
    temperature, softcap, ignore_index, backend = ctx.options
    needs_hidden, needs_weight, _, needs_bias = ctx.needs_input_grad[:4]
    needs_bias = needs_bias and bias is not None
    coefs = token_grad_coefficients((g_logp, g_entropy, g_lse, g_sum_z), entropy, targets != ignore_index)
    d_hidden, d_weight, d_bias = _head_stats_backward(
        hidden, weight, targets, bias, lse, *coefs, temperature, softcap, ignore_index, backend,
        needs_hidden, needs_weight, needs_bias,
    )  # fmt: skip
    return (
        d_hidden if needs_hidden else None,
        d_weight if needs_weight else None,
        None,
        d_bias if needs_bias else None,
        None, None, None, None,
    )  # fmt: skip


_head_stats.register_autograd(_backward, setup_context=_setup_context)


def head_stats(hidden, weight, targets, bias, transform: LogitTransform, backend: str) -> HeadStats:
    """Raw (unmasked) statistics through the custom op."""
    return HeadStats(*_head_stats(hidden, weight, targets, bias, transform.temperature, transform.softcap,
                                  transform.ignore_index, backend))  # fmt: skip

"""The logits-free core as `torch.library` custom ops, so that `torch.compile` traces through the loss without a
graph break: `fused_hybrid::token_statistics` (forward) and `fused_hybrid::token_statistics_backward`, with fake
(meta) implementations for tracing. `statistics_backward` is the one backward formula: the custom op's autograd
and the vocab-parallel autograd function both call it. The forward also returns each row's max logit m and log s
(core.SoftmaxNorm), which the backward forms log p = (z - m) - log s from, never z - lse."""

from __future__ import annotations

import torch

from .backends import backward_backend, logits_free_backend
from .core import (
    HeadStats,
    SoftmaxNorm,
    TokenGradCoefficients,
    finalize_partials,
    softmax_norm,
    stats_dtype,
    token_grad_coefficients,
)
from .head import HeadSpec


@torch.library.custom_op("fused_hybrid::token_statistics", mutates_args=())
def _token_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    workspace_bytes: int | None,
    gradient_filter: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse, sum_z, m, log s): HeadStats, then the SoftmaxNorm the backward reads. The arguments
    after `bias` are the HeadSpec, packed by HeadSpec.op_arguments."""
    head = HeadSpec.from_op_arguments(temperature, softcap, ignore_index, workspace_bytes, gradient_filter, backend)
    partials = logits_free_backend(backend).partials(hidden, weight, targets, bias, head)
    row_max, log_sum_exp = softmax_norm(partials)
    # the max is a row of the backend's partials buffer, as sum_z may be: outputs must not alias each other
    return (*(s.contiguous() for s in finalize_partials(partials)), row_max.clone(), log_sum_exp)


@_token_statistics.register_fake
def _(hidden, weight, targets, bias, temperature, softcap, ignore_index, workspace_bytes, gradient_filter, backend):
    out = hidden.new_empty(hidden.shape[0], dtype=stats_dtype(hidden.dtype))
    return out, *(torch.empty_like(out) for _ in range(5))


@torch.library.custom_op("fused_hybrid::token_statistics_backward", mutates_args=())
def _token_statistics_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    row_max: torch.Tensor,
    log_sum_exp: torch.Tensor,
    onehot_coef: torch.Tensor,
    prob_coef: torch.Tensor,
    logp_coef: torch.Tensor | None,
    uniform_coef: torch.Tensor | None,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    workspace_bytes: int | None,
    gradient_filter: float | None,
    backend: str,
    needs_hidden: bool,
    needs_weight: bool,
    needs_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden, dweight, dbias); a gradient that is not needed comes back as an empty tensor (no work done)."""
    coefs = TokenGradCoefficients(onehot_coef, prob_coef, logp_coef, uniform_coef)
    head = HeadSpec.from_op_arguments(temperature, softcap, ignore_index, workspace_bytes, gradient_filter, backend)
    norm = SoftmaxNorm(row_max, log_sum_exp)
    needs = (needs_hidden, needs_weight, needs_bias)
    grads = backward_backend(backend).backward(hidden, weight, targets, bias, norm, coefs, head, needs=needs)
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@_token_statistics_backward.register_fake
def _(
    hidden,
    weight,
    targets,
    bias,
    row_max,
    log_sum_exp,
    onehot_coef,
    prob_coef,
    logp_coef,
    uniform_coef,
    temperature,
    softcap,
    ignore_index,
    workspace_bytes,
    gradient_filter,
    backend,
    needs_hidden,
    needs_weight,
    needs_bias,
):
    # Every backend returns contiguous gradients, whatever the strides of hidden / weight (a transposed view):
    # new_empty(shape) is contiguous where empty_like would copy the input's strides.
    return (
        hidden.new_empty(hidden.shape) if needs_hidden else hidden.new_empty(0),
        weight.new_empty(weight.shape) if needs_weight else hidden.new_empty(0),
        bias.new_empty(bias.shape) if needs_bias else hidden.new_empty(0),
    )


def statistics_backward(
    hidden,
    weight,
    targets,
    bias,
    norm: SoftmaxNorm,
    entropy,
    valid,
    grads,
    head: HeadSpec,
    needs: tuple[bool, bool, bool],
):
    """(d_hidden, d_weight, d_bias) from the upstream gradients `grads` of (logp, entropy, lse, sum_z), None where
    not needed: the gradients are folded into per-token coefficients (core.token_grad_coefficients) and the
    backend `head.backend` recomputes the logit tiles, with log p = (z - m) - log s from `norm`."""
    needs_hidden, needs_weight, needs_bias = needs[0], needs[1], needs[2] and bias is not None
    coefs = token_grad_coefficients(grads, entropy, valid)
    d_hidden, d_weight, d_bias = _token_statistics_backward(
        hidden, weight, targets, bias, *norm, *coefs, *head.op_arguments(), needs_hidden, needs_weight, needs_bias
    )
    return (d_hidden if needs_hidden else None, d_weight if needs_weight else None, d_bias if needs_bias else None)


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, *head_arguments = inputs
    _, entropy, _, _, row_max, log_sum_exp = output
    ctx.save_for_backward(hidden, weight, targets, bias, row_max, log_sum_exp, entropy)
    ctx.mark_non_differentiable(row_max, log_sum_exp)
    ctx.head = HeadSpec.from_op_arguments(*head_arguments)
    # An output nobody used gets None, not a zero tensor, so its term of the backward costs no work.
    ctx.set_materialize_grads(False)


def _backward(ctx, g_logp, g_entropy, g_lse, g_sum_z, _g_max, _g_log_sum_exp):
    hidden, weight, targets, bias, row_max, log_sum_exp, entropy = ctx.saved_tensors
    needs_hidden, needs_weight, _, needs_bias = ctx.needs_input_grad[:4]
    d_hidden, d_weight, d_bias = statistics_backward(
        hidden,
        weight,
        targets,
        bias,
        SoftmaxNorm(row_max, log_sum_exp),
        entropy,
        targets != ctx.head.ignore_index,
        (g_logp, g_entropy, g_lse, g_sum_z),
        ctx.head,
        (needs_hidden, needs_weight, needs_bias),
    )
    return d_hidden, d_weight, None, d_bias, *(None,) * len(ctx.head.op_arguments())


_token_statistics.register_autograd(_backward, setup_context=_setup_context)


def token_statistics(hidden, weight, targets, bias, head: HeadSpec) -> HeadStats:
    """Raw (unmasked) statistics through the custom op, on the backend `head.backend`."""
    return HeadStats(*_token_statistics(hidden, weight, targets, bias, *head.op_arguments())[:4])

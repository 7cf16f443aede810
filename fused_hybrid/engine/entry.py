"""The validated entries to the logits-free core: they check the arguments, then run the custom op (or the
vocab-parallel path, or the naive reference) and mask ignored tokens' statistics to 0.

`linear_head_stats` returns differentiable statistics (any downstream use; the backward recomputes the logits).
`linear_head_loss` takes the loss as a function of the statistics: when that loss is token-separable and the
chunked engine runs, its gradient is computed inside the forward (three GEMMs, nothing recomputed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ..checks import check_head_inputs, check_targets_in_range
from . import chunked, divergence, reference, torch_divergence_epilogue
from .backends import resolve_backend
from .core import HeadStats, SoftmaxNorm, stats_dtype
from .custom_op import token_statistics
from .divergence import Teacher, TeacherHead
from .divergence_core import DivergenceRows
from .head import HeadSpec
from .vocab_parallel import vocab_parallel_head_stats


class _Call(NamedTuple):
    head: HeadSpec  # with the backend resolved ("auto" chosen)
    hidden_2d: torch.Tensor  # hidden, weight and bias in the compute dtype (in_compute_dtype)
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets_1d: torch.Tensor
    leading_shape: torch.Size
    given: tuple  # (hidden [N, D], weight, bias) as the caller gave them, before any autocast cast


def autocast_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The dtype torch.autocast computes a head on `tensor`'s device in, None outside an autocast region."""
    device_type = tensor.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def in_compute_dtype(hidden, weight, bias):
    """(hidden, weight, bias) in the dtype the head computes in: under torch.autocast, the autocast dtype for
    every floating input but float64, as F.linear would cast them. The engines then run with autocast off on
    these operands, so that the backward recomputes exactly the forward's logits (autocast does not reach a
    backward, so recomputing from the original fp32 operands would pair fp32 logits with a bf16 log-sum-exp).
    The casts are differentiable: the gradients reach the original tensors in their dtypes."""
    dtype = autocast_dtype(hidden)
    if dtype is None:
        return hidden, weight, bias

    def cast(t):
        eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible else t

    return cast(hidden), cast(weight), cast(bias)


def _prepare(hidden, weight, targets, bias, head: HeadSpec | None, head_options: dict) -> _Call:
    head = HeadSpec.resolve(head, head_options)
    given = (hidden, weight, bias)
    if isinstance(hidden, torch.Tensor):
        hidden, weight, bias = in_compute_dtype(hidden, weight, bias)
    check_head_inputs(hidden, weight, targets, bias)
    given = (given[0].reshape(-1, hidden.shape[-1]), *given[1:])
    resolved = resolve_backend(head.backend, hidden)
    vocab_size = weight.shape[0]
    if head.vocab_parallel is not None:
        if resolved == "reference":
            raise ValueError("vocab_parallel runs on the logits-free backends, not on 'reference'")
        vocab_size = head.vocab_parallel.layout(weight.shape[0], weight.device)[1]
    check_targets_in_range(targets, vocab_size, head.ignore_index)
    head = dataclasses.replace(head, backend=resolved) if resolved != head.backend else head
    targets_1d = targets.reshape(-1).to(torch.int64).contiguous()
    return _Call(head, hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets_1d, targets.shape, given)


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
    ``ignore_index``, ``backend``, ``workspace_bytes``, ``gradient_filter``, ``vocab_parallel``) say how the logits
    are formed and computed. With ``vocab_parallel``, `weight` and `bias` are this rank's slice of the head and the
    statistics are those of the full vocabulary (see engine.vocab_parallel).
    """
    call = _prepare(hidden, weight, targets, bias, head, head_options)
    with torch.autocast(call.hidden_2d.device.type, enabled=False):
        return _head_stats(call)


def _head_stats(call: _Call) -> HeadStats:
    head_inputs = (call.hidden_2d, call.weight, call.targets_1d, call.bias, call.head)
    if call.head.backend == "reference":
        stats = reference.head_stats(*head_inputs)
    elif call.head.vocab_parallel is not None:
        stats = vocab_parallel_head_stats(*head_inputs)
    else:
        raw = token_statistics(*head_inputs)
        # Ignored tokens read 0; their gradient coefficients are 0 too (see token_grad_coefficients).
        valid = call.targets_1d != call.head.ignore_index
        stats = HeadStats(*(torch.where(valid, statistic, 0.0) for statistic in raw))
    return HeadStats(*(s.reshape(call.leading_shape) for s in stats))


# loss_of_stats(HeadStats with the shape of targets) -> (scalar loss, anything else the caller wants back)
LossOfStats = Callable[[HeadStats], tuple[torch.Tensor, Any]]


def linear_head_loss(
    loss_of_stats: LossOfStats,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    separable: bool,
    groups: torch.Tensor | None = None,
    head: HeadSpec | None = None,
    **head_options,
) -> tuple[torch.Tensor, Any]:
    """``loss_of_stats(linear_head_stats(...))``, with the gradient computed inside the forward when it can be.

    That takes: the chunked engine (``backend="chunked"``, or ``"auto"`` choosing it), a loss the caller declares
    ``separable`` (a sum of terms each depending on one token's statistics and inputs, with normalisers that depend
    on masks only; with ``groups``, a group id >= 0 per token of the shape of `targets`, each term depends on one
    group's tokens: a sequence, a preference pair, and chunks hold whole groups, the two-pass path running when a
    group alone exceeds the workspace), no vocab-parallel head, a gradient due for hidden / weight / bias, and
    eager mode (under torch.compile the custom op's two passes run). `loss_of_stats` must then depend on no other
    tensor that requires grad: it is evaluated on detached statistics. It is called once per chunk to give that
    chunk's upstream gradients (autograd of the loss at those tokens), once on zeros before any GEMM (so that a bad
    input fails first), and once on the final statistics for the returned value.
    """
    call = _prepare(hidden, weight, targets, bias, head, head_options)
    with torch.autocast(call.hidden_2d.device.type, enabled=False):
        return _head_loss(loss_of_stats, call, separable, groups)


def _head_loss(loss_of_stats: LossOfStats, call: _Call, separable: bool, groups) -> tuple[torch.Tensor, Any]:
    hidden, weight, bias = call.hidden_2d, call.weight, call.bias
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    in_forward = (
        separable
        and call.head.backend == "chunked"
        and call.head.vocab_parallel is None
        and torch.is_grad_enabled()
        and any(needs)
        and not torch.compiler.is_compiling()
    )
    if not in_forward:
        return loss_of_stats(_head_stats(call))  # the arguments are checked once

    def shaped(stats: HeadStats) -> HeadStats:
        return HeadStats(*(s.reshape(call.leading_shape) for s in stats))

    with torch.no_grad():  # every input checked before the first GEMM
        zeros = torch.zeros(call.targets_1d.shape, dtype=stats_dtype(hidden.dtype), device=hidden.device)
        loss_of_stats(shaped(HeadStats(zeros, zeros, zeros, zeros)))

    def chunk_gradients(stats: HeadStats, rows):
        leaves = [s.detach().requires_grad_() for s in stats]
        with torch.enable_grad():
            loss, _ = loss_of_stats(shaped(HeadStats(*leaves)))
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return tuple(None if g is None else g[rows] for g in grads)

    # The gradients come back in the dtypes of the tensors the caller gave: an fp32 parameter that autocast
    # computes in bf16 gets its fp32 sum, never rounded to bf16.
    given_hidden, given_weight, given_bias = call.given
    grad_dtypes = (given_hidden.dtype, given_weight.dtype, None if given_bias is None else given_bias.dtype)
    with torch.no_grad():
        swept = chunked.statistics_and_gradients(
            hidden.detach(),
            weight.detach(),
            call.targets_1d,
            None if bias is None else bias.detach(),
            call.head,
            chunk_gradients,
            needs,
            groups=None if groups is None else groups.reshape(-1),
            grad_dtypes=grad_dtypes,
        )
    if swept is None:  # a group too large for one chunk
        return loss_of_stats(_head_stats(call))
    stats, (d_hidden, d_weight, d_bias) = swept
    with torch.no_grad():
        loss, extras = loss_of_stats(shaped(stats))
    return _GradientFromForward.apply(loss, *call.given, d_hidden, d_weight, d_bias), extras


class _GradientFromForward(torch.autograd.Function):
    """The loss value, with the gradients the forward already computed (scaled by grad_output in backward)."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, d_hidden, d_weight, d_bias):
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        ctx.set_materialize_grads(False)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None:
            return None, None, None, None, None, None, None
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return None, *grads, None, None, None


# loss_of_rows(DivergenceRows [N], flat) -> (scalar loss, anything else the caller wants back)
LossOfRows = Callable[[DivergenceRows], tuple[torch.Tensor, Any]]


def linear_divergence_loss(
    loss_of_rows: LossOfRows,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    teacher: Teacher,
    beta: float,
    head: HeadSpec,
) -> tuple[torch.Tensor, Any]:
    """``loss_of_rows`` of the divergence sweep (engine.divergence) of the student head against `teacher` (checked
    by the caller; its hidden states [N, D_t] or top-k inputs [N, k]), the gradient computed inside the forward.

    `loss_of_rows` must be token-separable with normalisers that depend on masks only: it is evaluated on detached
    rows, once on zeros before any GEMM (so that a bad input fails first), once per chunk for that chunk's upstream
    gradients (autograd of the loss at those tokens) and once on the final rows for the returned value. With
    ``backend="reference"`` both heads' logits are built whole and autograd differentiates (the naive baseline)."""
    if head.backend == "triton":
        raise ValueError(
            "backend='triton' (the tile kernels) has no two-head form: distillation runs on the chunked engine "
            "('chunked', or 'torch' for its PyTorch epilogue; 'auto' picks 'chunked') or on 'reference'"
        )
    if head.vocab_parallel is not None:
        raise ValueError("distillation does not take a vocab_parallel head: pass the whole student and teacher heads")
    call = _prepare(hidden, weight, targets, bias, head, {})
    if isinstance(teacher, TeacherHead):
        teacher_hidden, teacher_weight, teacher_bias = in_compute_dtype(teacher.hidden, teacher.weight, teacher.bias)
        teacher = TeacherHead(
            teacher_hidden.detach(),
            teacher_weight.detach(),
            None if teacher_bias is None else teacher_bias.detach(),
            teacher.head,
        )
    with torch.autocast(call.hidden_2d.device.type, enabled=False):
        return _divergence_loss(loss_of_rows, call, teacher, beta)


def _divergence_loss(loss_of_rows: LossOfRows, call: _Call, teacher: Teacher, beta: float):
    hidden, weight, bias, head = call.hidden_2d, call.weight, call.bias, call.head
    if head.backend == "reference":
        return loss_of_rows(reference.divergence_rows(hidden, weight, call.targets_1d, bias, head, teacher, beta))
    epilogue = torch_divergence_epilogue if head.backend == "torch" else None
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if not (torch.is_grad_enabled() and any(needs)):
        with torch.no_grad():
            rows, _ = divergence.statistics_and_gradients(
                hidden, weight, call.targets_1d, bias, head, teacher, beta, epilogue=epilogue
            )
            return loss_of_rows(rows)

    with torch.no_grad():  # every input checked before the first GEMM
        zeros = torch.zeros(call.targets_1d.shape, dtype=stats_dtype(hidden.dtype), device=hidden.device)
        loss_of_rows(DivergenceRows(zeros, zeros, zeros, SoftmaxNorm(zeros, zeros), SoftmaxNorm(zeros, zeros), zeros))

    def chunk_gradients(rows: DivergenceRows, chunk):
        divergence_leaf, logp_leaf = rows.divergence.detach().requires_grad_(), rows.logp.detach().requires_grad_()
        with torch.enable_grad():
            loss, _ = loss_of_rows(rows._replace(divergence=divergence_leaf, logp=logp_leaf))
            grads = torch.autograd.grad(loss, (divergence_leaf, logp_leaf), allow_unused=True)
        return tuple(
            torch.zeros_like(leaf[chunk]) if g is None else g[chunk]
            for g, leaf in zip(grads, (divergence_leaf, logp_leaf))
        )

    given_hidden, given_weight, given_bias = call.given
    grad_dtypes = (given_hidden.dtype, given_weight.dtype, None if given_bias is None else given_bias.dtype)
    with torch.no_grad():
        rows, (d_hidden, d_weight, d_bias) = divergence.statistics_and_gradients(
            hidden.detach(),
            weight.detach(),
            call.targets_1d,
            None if bias is None else bias.detach(),
            head,
            teacher,
            beta,
            chunk_gradients=chunk_gradients,
            needs=needs,
            grad_dtypes=grad_dtypes,
            epilogue=epilogue,
        )
        loss, extras = loss_of_rows(rows)
    return _GradientFromForward.apply(loss, *call.given, d_hidden, d_weight, d_bias), extras

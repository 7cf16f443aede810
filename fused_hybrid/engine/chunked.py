"""The chunked engine: per chunk of tokens, the logits GEMM (cuBLAS on CUDA), one epilogue that reduces each row
to its fp32 statistics and, where a gradient is due, turns the logits into dz, then ``dhidden = dz @ W`` and
``dweight += dz^T @ hidden`` (dweight accumulated in fp32 across chunks).

A chunk holds at most `HeadSpec.workspace_bytes` of logits and epilogue temporaries (default: at most 1 GiB on
CUDA; 512 rows, at most 256 MiB, on a CPU: core.default_chunk_bytes), whatever N is. Tokens whose target is
ignored are compacted away before any GEMM: that reads the number of loss tokens on the host once per call (one
sync on CUDA); while a CUDA graph is being captured every token goes through instead.

Two ways to run it:
- two passes (`partials`, then `backward`), for arbitrary downstream use of the statistics: the backward recomputes
  each chunk's logits with the same GEMM on the same rows (bit-identical logits) -- four GEMMs in all;
- the gradient inside the forward (`statistics_and_gradients`), for a token-separable loss: the upstream gradient
  of a chunk's statistics is known as soon as they are, so dz is formed in the same sweep -- three GEMMs.

The epilogue is Triton's on CUDA (`fused_hybrid.kernels.logit_epilogue`: no N x V temporaries, dz written over
the logits) and PyTorch's elsewhere (`engine.torch_epilogue`), as backends.default_epilogue chooses; the "torch"
backend is this engine with the PyTorch epilogue on every device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .backends import default_epilogue
from .core import (
    HeadStats,
    RowExtras,
    SoftmaxNorm,
    TokenGradCoefficients,
    VocabPartials,
    default_chunk_bytes,
    finalize_partials,
    softmax_norm,
    stats_dtype,
    token_grad_coefficients,
)
from .head import HeadSpec

DETERMINISTIC_BACKWARD = True  # GEMMs and row reductions in a fixed order, no atomics
GEMM_ROW_MULTIPLE = 128  # chunk rows are rounded to it (when the budget allows) so the GEMM tiles stay full

Rows = slice | torch.Tensor  # a chunk's token rows: a range, or the indices of its loss tokens


def workspace_rows(vocab_size: int, bytes_per_logit: int, workspace_bytes: int) -> int:
    """The most rows a chunk may have."""
    return max(1, workspace_bytes // (vocab_size * bytes_per_logit))


def chunk_rows(num_tokens: int, vocab_size: int, bytes_per_logit: int, workspace_bytes: int) -> int:
    """Rows per chunk: as many as the workspace holds, spread evenly over the chunks N needs, rounded up to whole
    GEMM tiles where the budget allows."""
    most = workspace_rows(vocab_size, bytes_per_logit, workspace_bytes)
    num_chunks = max(1, -(-num_tokens // most))
    rows = max(1, -(-num_tokens // num_chunks))
    rounded = -(-rows // GEMM_ROW_MULTIPLE) * GEMM_ROW_MULTIPLE
    return rounded if rounded <= most else rows


def plan_chunks(
    valid: torch.Tensor, vocab_size: int, bytes_per_logit: int, workspace_bytes: int, groups: torch.Tensor | None = None
) -> list[Rows] | None:
    """The token rows of each chunk: ranges of all tokens, or the indices of the loss tokens when some are
    ignored (reading their number is the engine's one host sync; skipped during CUDA graph capture).

    With `groups` (a group id >= 0 per token: a sequence, a preference pair), every chunk holds whole groups' loss
    tokens, groups in id order: None when that cannot be done, because one group alone exceeds the workspace or
    because a CUDA graph is being captured (the group sizes are read on the host)."""
    num_tokens = valid.shape[0]
    capturing = valid.is_cuda and torch.cuda.is_current_stream_capturing()
    if groups is not None:
        return None if capturing else _group_chunks(valid, groups, vocab_size, bytes_per_logit, workspace_bytes)
    if not capturing:
        loss_tokens = valid.nonzero().squeeze(1)
        if loss_tokens.numel() < num_tokens:
            rows = chunk_rows(loss_tokens.numel(), vocab_size, bytes_per_logit, workspace_bytes)
            return list(loss_tokens.split(rows))
    rows = chunk_rows(num_tokens, vocab_size, bytes_per_logit, workspace_bytes)
    return [slice(start, min(start + rows, num_tokens)) for start in range(0, num_tokens, rows)]


def _group_chunks(valid, groups, vocab_size, bytes_per_logit, workspace_bytes) -> list[Rows] | None:
    loss_tokens = valid.nonzero().squeeze(1)
    token_groups = groups[loss_tokens]
    order = loss_tokens[torch.argsort(token_groups, stable=True)]
    sizes = [size for size in torch.bincount(token_groups).tolist() if size]
    if not sizes:  # no loss token: one empty chunk, as plan_chunks gives
        return [loss_tokens]
    # chunks of about the engine's usual size, or of the largest group's when that is larger and fits
    limit = max(chunk_rows(len(order), vocab_size, bytes_per_logit, workspace_bytes), max(sizes))
    if limit > workspace_rows(vocab_size, bytes_per_logit, workspace_bytes):
        return None
    chunk_sizes = [0]
    for size in sizes:
        if chunk_sizes[-1] + size > limit:
            chunk_sizes.append(0)
        chunk_sizes[-1] += size
    return list(order.split(chunk_sizes))


def local_targets(targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Targets that are columns of this weight, -1 for the others (ignored, or on another vocab-parallel shard)."""
    return torch.where((targets >= 0) & (targets < vocab_size), targets, -1)


class _Sweep(NamedTuple):
    epilogue: object
    column_targets: torch.Tensor  # targets that are columns of this weight, -1 for the others
    plan: list[Rows]


def _sweep(hidden, weight, targets, head: HeadSpec, epilogue, groups=None) -> _Sweep:
    """What every pass over the chunks needs: the epilogue, the targets in this weight's columns, the chunks (None
    when `groups` cannot be kept whole)."""
    epilogue = epilogue or default_epilogue(hidden)
    per_logit = epilogue.bytes_per_logit(hidden.dtype)
    workspace_bytes = head.workspace_bytes or default_chunk_bytes(hidden.device, weight.shape[0], per_logit)
    valid = targets != head.ignore_index
    plan = plan_chunks(valid, weight.shape[0], per_logit, workspace_bytes, groups)
    return _Sweep(epilogue, local_targets(targets, weight.shape[0]), plan)


class _Gradients:
    """dhidden, dweight and dbias accumulated chunk by chunk (dweight and dbias in fp32 for half inputs). With a
    single chunk, dweight is that chunk's GEMM written in its output dtype (cuBLAS sums in fp32 inside): no
    V x D fp32 buffer at all. The gradients come back in the inputs' dtypes, or in `grad_dtypes` (hidden, weight,
    bias), e.g. fp32 for fp32 parameters that an autocast region computes in bf16."""

    def __init__(
        self, hidden, weight, bias, needs: tuple[bool, bool, bool], plan: list[Rows], grad_dtypes: tuple | None = None
    ) -> None:
        needs_hidden, needs_weight, needs_bias = needs
        self.grad_dtypes = grad_dtypes or (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        acc = dict(dtype=stats_dtype(hidden.dtype), device=weight.device)
        # Rows left out of every chunk (ignored tokens) keep a zero gradient; gradients come back contiguous
        # whatever the inputs' strides (the custom op's fake implementation says so).
        compacted = not all(isinstance(rows, slice) for rows in plan)
        new = torch.zeros if compacted else torch.empty
        self.hidden = new(hidden.shape, dtype=self.grad_dtypes[0], device=hidden.device) if needs_hidden else None
        self.single_chunk = len(plan) == 1
        self.weight = torch.zeros(weight.shape, **acc) if needs_weight and not self.single_chunk else None
        self.needs_weight = needs_weight
        self.bias = torch.zeros(weight.shape[0], **acc) if needs_bias else None

    def add_chunk(self, d_z, logits, rows: Rows, hidden_rows, weight) -> None:
        """Add the chunk's dz ([rows, V], fp32 or the input dtype; `logits` may be overwritten with it)."""
        if self.bias is not None:
            self.bias += d_z.sum(0, dtype=self.bias.dtype)
        if d_z.dtype != hidden_rows.dtype:
            d_z = logits.copy_(d_z)
        if self.hidden is not None:
            self.hidden[rows] = matmul_to(d_z, weight, self.hidden.dtype)
        if self.needs_weight and self.single_chunk:
            self.weight = matmul_to(d_z.T, hidden_rows, self.grad_dtypes[1])
        elif self.needs_weight:
            accumulate_matmul(self.weight, d_z.T, hidden_rows)

    def result(self, weight, bias):
        if self.needs_weight and self.weight is None:  # no token reached the head
            self.weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        return (
            self.hidden,
            None if self.weight is None else self.weight.to(self.grad_dtypes[1]),
            None if self.bias is None else self.bias.to(self.grad_dtypes[2]),
        )


def matmul_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b written in `dtype` (wider than the operands' for fp32 gradients of half operands: cuBLAS writes the
    fp32 sum directly; elsewhere the operands are upcast)."""
    if a.dtype == dtype:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=dtype)
    return a.to(dtype) @ b.to(dtype)


def accumulate_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc in fp32 (fp64) and a, b possibly half: cuBLAS writes the fp32 sum directly."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += (a @ b).to(acc.dtype)


def partials(hidden, weight, targets, bias, head: HeadSpec, *, epilogue=None) -> VocabPartials:
    """Per-token sums over this weight's rows (see VocabPartials), chunk by chunk; 0 for ignored tokens (a token
    no chunk swept reads max 0 and sum 0, which core.finalize_partials turns into finite statistics)."""
    return partials_and_extras(hidden, weight, targets, bias, head, extras=False, epilogue=epilogue)[0]


def partials_and_extras(
    hidden, weight, targets, bias, head: HeadSpec, *, extras: bool, epilogue=None
) -> tuple[VocabPartials, RowExtras | None]:
    """VocabPartials and, with `extras`, RowExtras (sum exp(2 (z - m)), the max logit before the target) from the
    same sweep: one more read of each chunk's logits, no more GEMMs."""
    epilogue, column_targets, plan = _sweep(hidden, weight, targets, head, epilogue)
    out = torch.zeros(7 if extras else 5, hidden.shape[0], dtype=stats_dtype(hidden.dtype), device=hidden.device)
    for rows in plan:
        logits = hidden[rows] @ weight.T
        chunk_partials, state = epilogue.statistics(logits, column_targets[rows], bias, head)
        out[:5, rows] = torch.stack(chunk_partials)
        if extras:
            chunk_extras = epilogue.extras(logits, state, column_targets[rows], bias, head, chunk_partials.max)
            out[5:, rows] = torch.stack(chunk_extras)
    return VocabPartials(*out[:5]), RowExtras(*out[5:]) if extras else None


def backward(
    hidden,
    weight,
    targets,
    bias,
    norm: SoftmaxNorm,
    coefs: TokenGradCoefficients,
    head: HeadSpec,
    needs: tuple[bool, bool, bool],
    *,
    grad_dtypes: tuple | None = None,
    epilogue=None,
):
    """(d_hidden, d_weight, d_bias), None where not needed, recomputing each chunk's logits (log p from the rows'
    max and log sum exp, `norm`); in the inputs' dtypes or in `grad_dtypes` (hidden, weight, bias)."""
    epilogue, column_targets, plan = _sweep(hidden, weight, targets, head, epilogue)
    grads = _Gradients(hidden, weight, bias, needs, plan, grad_dtypes)
    if any(needs):
        for rows in plan:
            hidden_rows = hidden[rows]
            logits = hidden_rows @ weight.T
            chunk_coefs = TokenGradCoefficients(*(None if c is None else c[rows] for c in coefs))
            chunk_norm = SoftmaxNorm(*(t[rows] for t in norm))
            d_z = epilogue.gradient(logits, None, column_targets[rows], bias, chunk_norm, chunk_coefs, head)
            grads.add_chunk(d_z, logits, rows, hidden_rows, weight)
    return grads.result(weight, bias)


# chunk_gradients(statistics so far, rows) -> upstream gradients of (logp, entropy, lse, sum_z) at `rows`
ChunkGradients = Callable[[HeadStats, Rows], tuple[torch.Tensor | None, ...]]


def statistics_and_gradients(
    hidden,
    weight,
    targets,
    bias,
    head: HeadSpec,
    chunk_gradients: ChunkGradients,
    needs: tuple[bool, bool, bool],
    *,
    groups=None,
    grad_dtypes=None,
    epilogue=None,
):
    """One sweep, three GEMMs: the finalised statistics [N] (0 at ignored tokens) and (d_hidden, d_weight,
    d_bias) of a loss whose upstream gradients at a chunk's rows `chunk_gradients` gives from the statistics of the
    tokens swept so far (those rows included). That is its gradient when the loss is token-separable, or, with
    `groups` (see plan_chunks), separable over the groups; None when the groups cannot be kept whole. The gradients
    are in the inputs' dtypes or in `grad_dtypes` (hidden, weight, bias)."""
    epilogue, column_targets, plan = _sweep(hidden, weight, targets, head, epilogue, groups)
    if plan is None:
        return None
    valid = targets != head.ignore_index
    grads = _Gradients(hidden, weight, bias, needs, plan, grad_dtypes)
    statistics = torch.zeros(4, hidden.shape[0], dtype=stats_dtype(hidden.dtype), device=hidden.device)
    for rows in plan:
        hidden_rows = hidden[rows]
        logits = hidden_rows @ weight.T
        chunk_partials, state = epilogue.statistics(logits, column_targets[rows], bias, head)
        chunk_stats = finalize_partials(chunk_partials)
        statistics[:, rows] = torch.stack(chunk_stats)
        upstream = chunk_gradients(HeadStats(*statistics), rows)
        coefs = token_grad_coefficients(upstream, chunk_stats.entropy, valid[rows])
        d_z = epilogue.gradient(logits, state, column_targets[rows], bias, softmax_norm(chunk_partials), coefs, head)
        grads.add_chunk(d_z, logits, rows, hidden_rows, weight)
    return HeadStats(*(torch.where(valid, s, 0.0) for s in statistics)), grads.result(weight, bias)

"""The divergence engine: a student head against a teacher's next-token distribution, without either head's logits
(docs/objectives.md, "Distillation").

Per chunk of tokens (ignored tokens compacted away first, the chunk bounded by the workspace as in engine.chunked):
the student's logits GEMM and the teacher's (or, for a top-k teacher, the k ids gathered from the student's row),
one epilogue that reduces both rows to the divergence, the student's entropy and target log-prob and writes the
student's dz, then ``dhidden = dz @ W`` and ``dweight += dz^T @ hidden``. With the loss's upstream gradients known
per chunk (a token-separable loss), the gradient is ready when the sweep ends: three student GEMMs and one teacher
GEMM. `backward` is the two-pass form (TRL's autograd function: the upstream gradient arrives later), which
recomputes both GEMMs. The teacher never receives a gradient.

The epilogue is Triton's on CUDA for two heads (fused_hybrid.kernels.divergence_epilogue) and PyTorch's elsewhere
and for a top-k teacher (engine.torch_divergence_epilogue), as backends.default_divergence_epilogue chooses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .backends import default_divergence_epilogue
from .chunked import Rows, _Gradients, local_targets, matmul_to, plan_chunks
from .core import SoftmaxNorm, default_workspace_bytes, stats_dtype
from .divergence_core import DivergenceRows
from .head import HeadSpec


class TeacherHead(NamedTuple):
    """The teacher's hidden states [N, D_t], its head [V, D_t] (and bias), and how its logits are formed (the
    distillation temperature folded in, divergence_core.with_temperature)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    head: HeadSpec


class TopKTeacher(NamedTuple):
    """The teacher's k most likely ids [N, k] (int64) and its log-probs there [N, k] (the stats dtype)."""

    ids: torch.Tensor
    logp: torch.Tensor


Teacher = TeacherHead | TopKTeacher

# chunk_gradients(rows swept so far, these rows) -> the upstream gradients (of the divergence, of the student's
# target log-prob) at these rows
ChunkGradients = Callable[[DivergenceRows, Rows], tuple[torch.Tensor, torch.Tensor]]

_FIELDS = 8  # divergence, entropy, logp, student (max, log s), teacher (max, log s), aux


def _unpack(table: torch.Tensor) -> DivergenceRows:
    return DivergenceRows(
        table[0], table[1], table[2], SoftmaxNorm(table[3], table[4]), SoftmaxNorm(table[5], table[6]), table[7]
    )


def _flat(rows: DivergenceRows) -> list[torch.Tensor]:
    return [rows.divergence, rows.entropy, rows.logp, *rows.student_norm, *rows.teacher_norm, rows.aux]


def head_logits(hidden_rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A chunk's logits in the stats dtype: for half-precision heads the GEMM's fp32 sum, not rounded to the
    input dtype (a divergence between two close distributions is a difference of their logits, which bf16
    rounding of |z| ~ 20 would move by 0.04; cuBLAS writes fp32 directly, elsewhere the operands are upcast)."""
    return matmul_to(hidden_rows, weight.T, stats_dtype(hidden_rows.dtype))


class _Sweep(NamedTuple):
    epilogue: object
    column_targets: torch.Tensor
    plan: list[Rows]


def _sweep(hidden, weight, targets, head: HeadSpec, teacher: Teacher, epilogue) -> _Sweep:
    epilogue = epilogue or default_divergence_epilogue(hidden, teacher)
    teacher_dtype = teacher.hidden.dtype if isinstance(teacher, TeacherHead) else None
    workspace_bytes = head.workspace_bytes or default_workspace_bytes(hidden.device)
    valid = targets != head.ignore_index
    plan = plan_chunks(valid, weight.shape[0], epilogue.bytes_per_logit(hidden.dtype, teacher_dtype), workspace_bytes)
    return _Sweep(epilogue, local_targets(targets, weight.shape[0]), plan)


def _chunk_statistics(epilogue, logits, teacher: Teacher, rows: Rows, targets, bias, head, beta):
    """(DivergenceRows of the chunk, the epilogue's state, the teacher's logits or None)."""
    if isinstance(teacher, TopKTeacher):
        stats, state = epilogue.topk_statistics(logits, targets, bias, head, teacher.ids[rows], teacher.logp[rows])
        return stats, state, None
    teacher_logits = head_logits(teacher.hidden[rows], teacher.weight)
    stats, state = epilogue.statistics(logits, teacher_logits, targets, bias, teacher.bias, head, teacher.head, beta)
    return stats, state, teacher_logits


def _chunk_gradient(
    epilogue, logits, teacher_logits, state, teacher, rows, targets, bias, head, beta, stats, g_div, g_logp, dz_dtype
):
    if isinstance(teacher, TopKTeacher):
        return epilogue.topk_gradient(state, targets, head, teacher.ids[rows], g_div, g_logp, dz_dtype=dz_dtype)
    return epilogue.gradient(
        logits,
        teacher_logits,
        state,
        targets,
        bias,
        teacher.bias,
        head,
        teacher.head,
        beta,
        stats,
        g_div,
        g_logp,
        dz_dtype=dz_dtype,
    )


def statistics_and_gradients(
    hidden,
    weight,
    targets,
    bias,
    head: HeadSpec,
    teacher: Teacher,
    beta: float,
    *,
    chunk_gradients: ChunkGradients | None = None,
    needs: tuple[bool, bool, bool] = (False, False, False),
    grad_dtypes: tuple | None = None,
    epilogue=None,
) -> tuple[DivergenceRows, tuple]:
    """One sweep: the DivergenceRows [N] (0 at ignored tokens) and, where `needs` asks and `chunk_gradients` gives
    each chunk's upstream gradients, (d_hidden, d_weight, d_bias) in the inputs' dtypes or `grad_dtypes`."""
    epilogue, column_targets, plan = _sweep(hidden, weight, targets, head, teacher, epilogue)
    with_gradients = chunk_gradients is not None and any(needs)
    grads = _Gradients(hidden, weight, bias, needs, plan, grad_dtypes) if with_gradients else None
    table = torch.zeros(_FIELDS, hidden.shape[0], dtype=stats_dtype(hidden.dtype), device=hidden.device)
    for rows in plan:
        hidden_rows = hidden[rows]
        logits = head_logits(hidden_rows, weight)
        chunk_targets = column_targets[rows]
        stats, state, teacher_logits = _chunk_statistics(
            epilogue, logits, teacher, rows, chunk_targets, bias, head, beta
        )
        table[:, rows] = torch.stack(_flat(stats))
        if grads is not None:
            g_div, g_logp = chunk_gradients(_unpack(table), rows)
            d_z = _chunk_gradient(
                epilogue,
                logits,
                teacher_logits,
                state,
                teacher,
                rows,
                chunk_targets,
                bias,
                head,
                beta,
                stats,
                g_div,
                g_logp,
                hidden.dtype,
            )
            grads.add_chunk(d_z, logits, rows, hidden_rows, weight)
    return _unpack(table), (None, None, None) if grads is None else grads.result(weight, bias)


def backward(
    hidden,
    weight,
    targets,
    bias,
    head: HeadSpec,
    teacher: TeacherHead,
    beta: float,
    stats: DivergenceRows,
    g_div: torch.Tensor,
    g_logp: torch.Tensor,
    needs: tuple[bool, bool, bool],
    *,
    grad_dtypes: tuple | None = None,
    epilogue=None,
):
    """(d_hidden, d_weight, d_bias) of ``sum g_div * divergence + g_logp * logp``, recomputing both heads' logits
    per chunk (log p from `stats`' norms); the teacher's head only, a top-k teacher has no two-pass form."""
    epilogue, column_targets, plan = _sweep(hidden, weight, targets, head, teacher, epilogue)
    grads = _Gradients(hidden, weight, bias, needs, plan, grad_dtypes)
    if any(needs):
        for rows in plan:
            hidden_rows = hidden[rows]
            logits = head_logits(hidden_rows, weight)
            teacher_logits = head_logits(teacher.hidden[rows], teacher.weight)
            chunk_stats = DivergenceRows(*(_index(field, rows) for field in stats))
            d_z = _chunk_gradient(
                epilogue,
                logits,
                teacher_logits,
                None,
                teacher,
                rows,
                column_targets[rows],
                bias,
                head,
                beta,
                chunk_stats,
                g_div[rows],
                g_logp[rows],
                hidden.dtype,
            )
            grads.add_chunk(d_z, logits, rows, hidden_rows, weight)
    return grads.result(weight, bias)


def _index(field, rows):
    return SoftmaxNorm(*(t[rows] for t in field)) if isinstance(field, SoftmaxNorm) else field[rows]

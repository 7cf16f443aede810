"""The divergence engine's epilogue on CUDA: three row-wise passes over a chunk of the student's logits and the
teacher's, which cuBLAS computed (docs/objectives.md, "Distillation").

`two_row_statistics_kernel` (grid: rows) sweeps both rows in BLOCK_V blocks, applies each head's bias, temperature
and softcap, and keeps per lane the online log-sum-exp of each (the student's also a = sum exp(z - m) (z - m),
for its entropy) and the student's target logit.

`two_row_divergence_kernel` (grid: rows), given both rows' max logit m and log s (core.SoftmaxNorm), sums the
divergence and the row sum its gradient needs (KL(p_s || p_t) for beta = 1, KL(p_s || m) between), from
log p = (z - m) - log s of each head: never a difference of two log-sum-exps, so a student close to its teacher
keeps a small divergence exact.

`two_row_dz_kernel` (grid: rows x vocabulary blocks) writes the student's dz of ``g_div * divergence + g_logp *
logp``, chained through its softcap and temperature, in the inputs' dtype: over the student's logits for fp32
heads; for half-precision heads, whose logits the GEMMs write in fp32 (engine.divergence.head_logits), into one
half-precision buffer, the left operand of the two gradient GEMMs.

All three are memory-bound (each reads both rows once; the last writes the student's); the GEMMs around them do
D (or D_t) times the work per element.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..engine.core import SoftmaxNorm
from ..engine.divergence_core import DivergenceRows
from ..engine.head import HeadSpec
from .logit_epilogue import BLOCK_V_GRADIENTS, BLOCK_V_STATISTICS, NUM_WARPS, block_v
from .logit_tile import (
    chain_to_raw_logits,
    merge_lanes,
    online_log_sum_exp,
    transform_arguments,
    transform_tile,
)

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2  # the divergence kernels' MODE, from beta


@triton.jit
def _log_mixture(log_ps, log_pt, log_one_minus_beta, log_beta):
    """log m, m = (1 - beta) p_s + beta p_t, as a log-add-exp of the two logs (no underflow of either)."""
    a = log_ps + log_one_minus_beta
    b = log_pt + log_beta
    top = tl.maximum(a, b)
    return top + tl.log(1.0 + tl.exp(tl.minimum(a, b) - top))


@triton.jit
def _transformed_rows(
    student_row,
    teacher_row,
    offs_v,
    mask_v,
    student_bias_ptr,
    student_inv_temperature,
    student_softcap,
    teacher_bias_ptr,
    teacher_inv_temperature,
    teacher_softcap,
    STUDENT_HAS_BIAS: tl.constexpr,
    STUDENT_HAS_SOFTCAP: tl.constexpr,
    TEACHER_HAS_BIAS: tl.constexpr,
    TEACHER_HAS_SOFTCAP: tl.constexpr,
):
    """(z_s, z_t): a block of both rows loaded in fp32 and transformed, each by its own head."""
    zs = transform_tile(
        tl.load(student_row + offs_v, mask=mask_v, other=0.0).to(tl.float32),
        student_bias_ptr,
        offs_v,
        mask_v,
        student_inv_temperature,
        student_softcap,
        STUDENT_HAS_BIAS,
        STUDENT_HAS_SOFTCAP,
    )
    zt = transform_tile(
        tl.load(teacher_row + offs_v, mask=mask_v, other=0.0).to(tl.float32),
        teacher_bias_ptr,
        offs_v,
        mask_v,
        teacher_inv_temperature,
        teacher_softcap,
        TEACHER_HAS_BIAS,
        TEACHER_HAS_SOFTCAP,
    )
    return zs, zt


@triton.jit
def two_row_statistics_kernel(
    student_ptr,
    teacher_ptr,
    targets_ptr,
    out_ptr,  # [6, rows] fp32: student m, s, a, z[y]; teacher m, s
    num_rows,
    V,
    stride_student,
    stride_teacher,
    student_bias_ptr,
    student_inv_temperature,
    student_softcap,
    teacher_bias_ptr,
    teacher_inv_temperature,
    teacher_softcap,
    STUDENT_HAS_BIAS: tl.constexpr,
    STUDENT_HAS_SOFTCAP: tl.constexpr,
    TEACHER_HAS_BIAS: tl.constexpr,
    TEACHER_HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    student_row = student_ptr + row.to(tl.int64) * stride_student
    teacher_row = teacher_ptr + row.to(tl.int64) * stride_teacher
    s_max = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    s_sum_exp = tl.zeros((BLOCK_V,), dtype=tl.float32)
    s_sum_exp_shifted = tl.zeros((BLOCK_V,), dtype=tl.float32)
    t_max = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    t_sum_exp = tl.zeros((BLOCK_V,), dtype=tl.float32)
    t_unused = tl.zeros((BLOCK_V,), dtype=tl.float32)  # the teacher's a: not needed, folded away by the compiler
    for v_start in range(0, V, BLOCK_V):
        offs_v = v_start + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        zs, zt = _transformed_rows(
            student_row,
            teacher_row,
            offs_v,
            mask_v,
            student_bias_ptr,
            student_inv_temperature,
            student_softcap,
            teacher_bias_ptr,
            teacher_inv_temperature,
            teacher_softcap,
            STUDENT_HAS_BIAS,
            STUDENT_HAS_SOFTCAP,
            TEACHER_HAS_BIAS,
            TEACHER_HAS_SOFTCAP,
        )
        s_max, s_sum_exp, s_sum_exp_shifted = online_log_sum_exp(s_max, s_sum_exp, s_sum_exp_shifted, zs, mask_v)
        t_max, t_sum_exp, t_unused = online_log_sum_exp(t_max, t_sum_exp, t_unused, zt, mask_v)
    s_row_max, s_row_sum_exp, s_row_sum_exp_shifted = merge_lanes(s_max, s_sum_exp, s_sum_exp_shifted)
    t_row_max, t_row_sum_exp, _ = merge_lanes(t_max, t_sum_exp, t_unused)

    target = tl.load(targets_ptr + row)
    has_target = target >= 0
    target_col = tl.where(has_target, target, 0)
    target_z = transform_tile(
        tl.load(student_row + target_col).to(tl.float32),
        student_bias_ptr,
        target_col,
        has_target,
        student_inv_temperature,
        student_softcap,
        STUDENT_HAS_BIAS,
        STUDENT_HAS_SOFTCAP,
    )
    tl.store(out_ptr + row, s_row_max)
    tl.store(out_ptr + num_rows + row, s_row_sum_exp)
    tl.store(out_ptr + 2 * num_rows + row, s_row_sum_exp_shifted)
    tl.store(out_ptr + 3 * num_rows + row, tl.where(has_target, target_z, 0.0))
    tl.store(out_ptr + 4 * num_rows + row, t_row_max)
    tl.store(out_ptr + 5 * num_rows + row, t_row_sum_exp)


@triton.jit
def _log_probs(
    student_row,
    teacher_row,
    offs_v,
    mask_v,
    s_max,
    s_log_sum_exp,
    t_max,
    t_log_sum_exp,
    student_bias_ptr,
    student_inv_temperature,
    student_softcap,
    teacher_bias_ptr,
    teacher_inv_temperature,
    teacher_softcap,
    STUDENT_HAS_BIAS: tl.constexpr,
    STUDENT_HAS_SOFTCAP: tl.constexpr,
    TEACHER_HAS_BIAS: tl.constexpr,
    TEACHER_HAS_SOFTCAP: tl.constexpr,
):
    """(z_s, log p_s, log p_t) of a block of both rows, log p = (z - m) - log s clamped to <= 0."""
    zs, zt = _transformed_rows(
        student_row,
        teacher_row,
        offs_v,
        mask_v,
        student_bias_ptr,
        student_inv_temperature,
        student_softcap,
        teacher_bias_ptr,
        teacher_inv_temperature,
        teacher_softcap,
        STUDENT_HAS_BIAS,
        STUDENT_HAS_SOFTCAP,
        TEACHER_HAS_BIAS,
        TEACHER_HAS_SOFTCAP,
    )
    log_ps = tl.minimum((zs - s_max) - s_log_sum_exp, 0.0)
    log_pt = tl.minimum((zt - t_max) - t_log_sum_exp, 0.0)
    return zs, log_ps, log_pt


@triton.jit
def two_row_divergence_kernel(
    student_ptr,
    teacher_ptr,
    s_max_ptr,
    s_log_sum_exp_ptr,
    t_max_ptr,
    t_log_sum_exp_ptr,
    out_ptr,  # [2, rows] fp32: the divergence, aux
    num_rows,
    V,
    stride_student,
    stride_teacher,
    beta,
    log_one_minus_beta,
    log_beta,
    student_bias_ptr,
    student_inv_temperature,
    student_softcap,
    teacher_bias_ptr,
    teacher_inv_temperature,
    teacher_softcap,
    STUDENT_HAS_BIAS: tl.constexpr,
    STUDENT_HAS_SOFTCAP: tl.constexpr,
    TEACHER_HAS_BIAS: tl.constexpr,
    TEACHER_HAS_SOFTCAP: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    student_row = student_ptr + row.to(tl.int64) * stride_student
    teacher_row = teacher_ptr + row.to(tl.int64) * stride_teacher
    s_max = tl.load(s_max_ptr + row)
    s_log_sum_exp = tl.load(s_log_sum_exp_ptr + row)
    t_max = tl.load(t_max_ptr + row)
    t_log_sum_exp = tl.load(t_log_sum_exp_ptr + row)
    lane_student = tl.zeros((BLOCK_V,), dtype=tl.float32)  # sum p_s (log p_s - log q), q = p_t or m
    lane_teacher = tl.zeros((BLOCK_V,), dtype=tl.float32)  # sum p_t (log p_t - log q)
    for v_start in range(0, V, BLOCK_V):
        offs_v = v_start + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        _, log_ps, log_pt = _log_probs(
            student_row,
            teacher_row,
            offs_v,
            mask_v,
            s_max,
            s_log_sum_exp,
            t_max,
            t_log_sum_exp,
            student_bias_ptr,
            student_inv_temperature,
            student_softcap,
            teacher_bias_ptr,
            teacher_inv_temperature,
            teacher_softcap,
            STUDENT_HAS_BIAS,
            STUDENT_HAS_SOFTCAP,
            TEACHER_HAS_BIAS,
            TEACHER_HAS_SOFTCAP,
        )
        if MODE == 0:
            lane_teacher += tl.where(mask_v, tl.exp(log_pt) * (log_pt - log_ps), 0.0)
        elif MODE == 1:
            lane_student += tl.where(mask_v, tl.exp(log_ps) * (log_ps - log_pt), 0.0)
        else:
            log_m = _log_mixture(log_ps, log_pt, log_one_minus_beta, log_beta)
            lane_student += tl.where(mask_v, tl.exp(log_ps) * (log_ps - log_m), 0.0)
            lane_teacher += tl.where(mask_v, tl.exp(log_pt) * (log_pt - log_m), 0.0)
    kl_student = tl.sum(lane_student, axis=0)
    kl_teacher = tl.sum(lane_teacher, axis=0)
    if MODE == 0:
        divergence = kl_teacher
    elif MODE == 1:
        divergence = kl_student
    else:
        divergence = beta * kl_teacher + (1.0 - beta) * kl_student
    tl.store(out_ptr + row, divergence)
    tl.store(out_ptr + num_rows + row, kl_student)


@triton.jit
def two_row_dz_kernel(
    student_ptr,  # [rows, V] the student's raw logits
    dz_ptr,  # [rows, V] dz out: the student's buffer itself, or one in the inputs' half precision
    teacher_ptr,
    targets_ptr,
    s_max_ptr,
    s_log_sum_exp_ptr,
    t_max_ptr,
    t_log_sum_exp_ptr,
    aux_ptr,
    g_div_ptr,
    g_logp_ptr,
    V,
    stride_student,
    stride_dz,
    stride_teacher,
    beta,
    log_one_minus_beta,
    log_beta,
    student_bias_ptr,
    student_inv_temperature,
    student_softcap,
    teacher_bias_ptr,
    teacher_inv_temperature,
    teacher_softcap,
    STUDENT_HAS_BIAS: tl.constexpr,
    STUDENT_HAS_SOFTCAP: tl.constexpr,
    TEACHER_HAS_BIAS: tl.constexpr,
    TEACHER_HAS_SOFTCAP: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    student_row = student_ptr + row.to(tl.int64) * stride_student
    teacher_row = teacher_ptr + row.to(tl.int64) * stride_teacher
    zs, log_ps, log_pt = _log_probs(
        student_row,
        teacher_row,
        offs_v,
        mask_v,
        tl.load(s_max_ptr + row),
        tl.load(s_log_sum_exp_ptr + row),
        tl.load(t_max_ptr + row),
        tl.load(t_log_sum_exp_ptr + row),
        student_bias_ptr,
        student_inv_temperature,
        student_softcap,
        teacher_bias_ptr,
        teacher_inv_temperature,
        teacher_softcap,
        STUDENT_HAS_BIAS,
        STUDENT_HAS_SOFTCAP,
        TEACHER_HAS_BIAS,
        TEACHER_HAS_SOFTCAP,
    )
    ps = tl.exp(log_ps)
    if MODE == 0:  # p_s - p_t
        unit = ps - tl.exp(log_pt)
    elif MODE == 1:  # p_s (log p_s - log p_t - KL(p_s || p_t))
        unit = ps * (log_ps - log_pt - tl.load(aux_ptr + row))
    else:  # (1 - beta) p_s (log p_s - log m - KL(p_s || m))
        log_m = _log_mixture(log_ps, log_pt, log_one_minus_beta, log_beta)
        unit = (1.0 - beta) * ps * (log_ps - log_m - tl.load(aux_ptr + row))
    g_logp = tl.load(g_logp_ptr + row)
    is_target = offs_v == tl.load(targets_ptr + row)
    d_z = tl.load(g_div_ptr + row) * unit + g_logp * (tl.where(is_target, 1.0, 0.0) - ps)
    d_z = chain_to_raw_logits(d_z, zs, student_inv_temperature, student_softcap, STUDENT_HAS_SOFTCAP)
    tl.store(dz_ptr + row.to(tl.int64) * stride_dz + offs_v, d_z.to(dz_ptr.dtype.element_ty), mask=mask_v)


def bytes_per_logit(student_dtype: torch.dtype, teacher_dtype: torch.dtype) -> int:
    """Both heads' fp32 logits and, for a half-precision student, its dz (written over its logits otherwise)."""
    dz = student_dtype.itemsize if student_dtype.itemsize < 4 else 0
    return 4 + 4 + dz


def _head_arguments(student_bias, student_head: HeadSpec, teacher_bias, teacher_head: HeadSpec) -> dict:
    """transform_tile's arguments of both heads, under the kernels' student_ / teacher_ names."""
    arguments = {}
    for prefix, bias, head in (("student", student_bias, student_head), ("teacher", teacher_bias, teacher_head)):
        for name, value in transform_arguments(bias, head).items():
            arguments[f"{prefix.upper()}_{name}" if name.isupper() else f"{prefix}_{name}"] = value
    return arguments


def _beta_arguments(beta: float) -> dict:
    mode = FORWARD_KL if beta == 0.0 else REVERSE_KL if beta == 1.0 else JSD
    logs = (math.log1p(-beta), math.log(beta)) if mode == JSD else (0.0, 0.0)
    return dict(beta=float(beta), log_one_minus_beta=logs[0], log_beta=logs[1], MODE=mode)


def statistics(s_logits, t_logits, targets, s_bias, t_bias, s_head: HeadSpec, t_head: HeadSpec, beta: float):
    """(DivergenceRows of each row, None: `gradient` needs nothing kept). `targets` is -1 where a row has no
    target column."""
    num_rows, vocab_size = s_logits.shape
    stats = torch.empty(6, num_rows, dtype=torch.float32, device=s_logits.device)
    sums = torch.zeros(2, num_rows, dtype=torch.float32, device=s_logits.device)
    heads = _head_arguments(s_bias, s_head, t_bias, t_head)
    block = block_v(s_logits, BLOCK_V_STATISTICS)
    shape = dict(num_rows=num_rows, V=vocab_size, stride_student=s_logits.stride(0), stride_teacher=t_logits.stride(0))
    if num_rows > 0:
        two_row_statistics_kernel[(num_rows,)](
            s_logits, t_logits, targets, stats, **shape, **heads, BLOCK_V=block, num_warps=NUM_WARPS
        )
    s_max, s_sum_exp, s_sum_exp_shifted, target_z, t_max, t_sum_exp = stats
    s_log_sum_exp, t_log_sum_exp = torch.log(s_sum_exp), torch.log(t_sum_exp)
    if num_rows > 0:
        two_row_divergence_kernel[(num_rows,)](
            s_logits,
            t_logits,
            s_max,
            s_log_sum_exp,
            t_max,
            t_log_sum_exp,
            sums,
            **shape,
            **_beta_arguments(beta),
            **heads,
            BLOCK_V=block,
            num_warps=NUM_WARPS,
        )
    logp = torch.where(targets >= 0, target_z - s_max - s_log_sum_exp, 0.0)
    entropy = s_log_sum_exp - s_sum_exp_shifted / s_sum_exp
    rows = DivergenceRows(
        sums[0], entropy, logp, SoftmaxNorm(s_max, s_log_sum_exp), SoftmaxNorm(t_max, t_log_sum_exp), sums[1]
    )
    return rows, None


def gradient(
    s_logits,
    t_logits,
    state,
    targets,
    s_bias,
    t_bias,
    s_head,
    t_head,
    beta,
    rows: DivergenceRows,
    g_div,
    g_logp,
    *,
    dz_dtype,
):
    """dz in `dz_dtype`, over `s_logits` when that is their dtype (the same tensor, overwritten), else in a new
    buffer; from `rows`' norms and aux."""
    num_rows, vocab_size = s_logits.shape
    d_z = s_logits if s_logits.dtype == dz_dtype else torch.empty_like(s_logits, dtype=dz_dtype)
    block = block_v(s_logits, BLOCK_V_GRADIENTS)
    if num_rows > 0:
        two_row_dz_kernel[(num_rows, triton.cdiv(vocab_size, block))](
            s_logits,
            d_z,
            t_logits,
            targets,
            *rows.student_norm,
            *rows.teacher_norm,
            rows.aux.contiguous(),
            g_div.to(torch.float32).contiguous(),
            g_logp.to(torch.float32).contiguous(),
            V=vocab_size,
            stride_student=s_logits.stride(0),
            stride_dz=d_z.stride(0),
            stride_teacher=t_logits.stride(0),
            **_beta_arguments(beta),
            **_head_arguments(s_bias, s_head, t_bias, t_head),
            BLOCK_V=block,
            num_warps=NUM_WARPS,
        )
    return d_z

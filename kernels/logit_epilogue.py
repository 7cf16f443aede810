"""The chunked engine's epilogue on CUDA: two row-wise passes over a chunk of logits that cuBLAS computed.

`row_statistics_kernel` (grid: rows) sweeps a row of raw logits in BLOCK_V blocks, applies bias, temperature and
softcap, and keeps per lane the running max m, s = sum exp(z - m) and a = sum exp(z - m) * (z - m) (the algebra
of the tile kernel's forward: H = log s - a / s has no cancellation), the sum of z and the target logit.

`row_extras_kernel` (grid: rows), on demand, sweeps a row once more, given its max m: sum exp(2 (z - m)) and the
largest logit before the target column (see core.RowExtras).

`row_dz_kernel` (grid: rows x vocabulary blocks) recomputes z from the raw logits and writes over them,
in their own dtype, dz = onehot_coef * 1[v = y] + p * (prob_coef - logp_coef * log p) + uniform_coef, chained
through softcap and temperature, with log p = (z - m) - log s from the row's max logit m and log s
(core.SoftmaxNorm; never z - lse, whose fp32 rounding would move every p of the row). Nothing of the chunk's size
is allocated: the logits buffer becomes the left operand of the two gradient GEMMs.

Both passes are memory-bound (a chunk's logits are read twice and written once); the GEMMs around them do
D times the work per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..engine.core import RowExtras, SoftmaxNorm, TokenGradCoefficients, VocabPartials
from ..engine.head import HeadSpec
from .logit_tile import (
    coefficient_arguments,
    dz_of_logits,
    in_interpreter,
    merge_lanes,
    online_log_sum_exp,
    transform_arguments,
    transform_tile,
)

BLOCK_V_STATISTICS = 2048
BLOCK_V_GRADIENTS = 1024
NUM_WARPS = 8
# Small blocks keep the CPU interpreter quick while still exercising multi-block rows and masking.
INTERPRETER_BLOCK_V = 32


@triton.jit
def row_statistics_kernel(
    logits_ptr,
    bias_ptr,
    targets_ptr,
    partials_ptr,  # [5, rows] fp32: max m, sum exp(z - m), sum exp(z - m) * (z - m), sum z, z[y]
    num_rows,
    V,
    stride_row,
    inv_temperature,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    lane_max = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    lane_sum_exp = tl.zeros((BLOCK_V,), dtype=tl.float32)
    lane_sum_exp_shifted = tl.zeros((BLOCK_V,), dtype=tl.float32)
    lane_sum_z = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v_start in range(0, V, BLOCK_V):
        offs_v = v_start + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        raw = tl.load(row_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        z = transform_tile(raw, bias_ptr, offs_v, mask_v, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
        lane_max, lane_sum_exp, lane_sum_exp_shifted = online_log_sum_exp(
            lane_max, lane_sum_exp, lane_sum_exp_shifted, z, mask_v
        )
        lane_sum_z += tl.where(mask_v, z, 0.0)
    row_max, sum_exp, sum_exp_shifted = merge_lanes(lane_max, lane_sum_exp, lane_sum_exp_shifted)

    target = tl.load(targets_ptr + row)
    has_target = target >= 0
    target_col = tl.where(has_target, target, 0)
    target_raw = tl.load(row_ptr + target_col).to(tl.float32)
    target_z = transform_tile(
        target_raw, bias_ptr, target_col, has_target, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP
    )
    tl.store(partials_ptr + row, row_max)
    tl.store(partials_ptr + num_rows + row, sum_exp)
    tl.store(partials_ptr + 2 * num_rows + row, sum_exp_shifted)
    tl.store(partials_ptr + 3 * num_rows + row, tl.sum(lane_sum_z, axis=0))
    tl.store(partials_ptr + 4 * num_rows + row, tl.where(has_target, target_z, 0.0))


@triton.jit
def row_extras_kernel(
    logits_ptr,
    bias_ptr,
    targets_ptr,
    max_ptr,  # [rows] the row's max logit (VocabPartials.max)
    extras_ptr,  # [2, rows] fp32: sum exp(2 (z - m)), max of z before the target column
    num_rows,
    V,
    stride_row,
    inv_temperature,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    row_max = tl.load(max_ptr + row)
    target = tl.load(targets_ptr + row)  # -1: no target column, nothing before it counts
    lane_sum_exp_sq = tl.zeros((BLOCK_V,), dtype=tl.float32)
    lane_before = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    for v_start in range(0, V, BLOCK_V):
        offs_v = v_start + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        raw = tl.load(row_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        z = transform_tile(raw, bias_ptr, offs_v, mask_v, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
        lane_sum_exp_sq += tl.where(mask_v, tl.exp(2.0 * (z - row_max)), 0.0)
        lane_before = tl.maximum(lane_before, tl.where(mask_v & (offs_v < target), z, float("-inf")))
    tl.store(extras_ptr + row, tl.sum(lane_sum_exp_sq, axis=0))
    tl.store(extras_ptr + num_rows + row, tl.max(lane_before, axis=0))


@triton.jit
def row_dz_kernel(
    logits_ptr,  # [rows, V] raw logits in, dz out (same dtype)
    bias_ptr,
    targets_ptr,
    max_ptr,  # [rows] the row's max logit m
    log_sum_exp_ptr,  # [rows] log sum exp(z - m)
    onehot_coef_ptr,
    prob_coef_ptr,
    logp_coef_ptr,
    uniform_coef_ptr,
    V,
    stride_row,
    inv_temperature,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LOGP_COEF: tl.constexpr,
    HAS_UNIFORM_COEF: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    ptrs = logits_ptr + row.to(tl.int64) * stride_row + offs_v
    raw = tl.load(ptrs, mask=mask_v, other=0.0).to(tl.float32)
    z = transform_tile(raw, bias_ptr, offs_v, mask_v, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
    is_target = offs_v == tl.load(targets_ptr + row)
    d_z = dz_of_logits(
        z,
        tl.load(max_ptr + row),
        tl.load(log_sum_exp_ptr + row),
        is_target,
        tl.load(onehot_coef_ptr + row),
        tl.load(prob_coef_ptr + row),
        tl.load(logp_coef_ptr + row) if HAS_LOGP_COEF else 0.0,
        tl.load(uniform_coef_ptr + row) if HAS_UNIFORM_COEF else 0.0,
        inv_temperature,
        softcap,
        HAS_LOGP_COEF,
        HAS_UNIFORM_COEF,
        HAS_SOFTCAP,
    )
    tl.store(ptrs, d_z.to(logits_ptr.dtype.element_ty), mask=mask_v)


def bytes_per_logit(dtype: torch.dtype) -> int:
    return dtype.itemsize  # the logits buffer only: dz is written over it


def block_v(logits: torch.Tensor, cuda_block: int) -> int:
    """The block of columns a row-wise epilogue kernel takes: `cuda_block` compiled, a small one interpreted."""
    return INTERPRETER_BLOCK_V if in_interpreter(logits.device) else cuda_block


def statistics(logits: torch.Tensor, targets: torch.Tensor, bias, head: HeadSpec):
    """(VocabPartials of each row of `logits` [rows, V], None: `gradient` needs nothing kept). `targets` is -1
    where a row's target is not a column of this weight."""
    num_rows, vocab_size = logits.shape
    out = torch.empty(5, num_rows, dtype=torch.float32, device=logits.device)
    if num_rows > 0:
        row_statistics_kernel[(num_rows,)](
            logits,
            targets_ptr=targets,
            partials_ptr=out,
            num_rows=num_rows,
            V=vocab_size,
            stride_row=logits.stride(0),
            **transform_arguments(bias, head),
            BLOCK_V=block_v(logits, BLOCK_V_STATISTICS),
            num_warps=NUM_WARPS,
        )
    return VocabPartials(*out), None


def extras(
    logits: torch.Tensor, state, targets: torch.Tensor, bias, head: HeadSpec, row_max: torch.Tensor
) -> RowExtras:
    """RowExtras of each row of `logits`, given the rows' max logits (one more read of the chunk)."""
    num_rows, vocab_size = logits.shape
    out = torch.empty(2, num_rows, dtype=torch.float32, device=logits.device)
    if num_rows > 0:
        row_extras_kernel[(num_rows,)](
            logits,
            targets_ptr=targets,
            max_ptr=row_max,
            extras_ptr=out,
            num_rows=num_rows,
            V=vocab_size,
            stride_row=logits.stride(0),
            **transform_arguments(bias, head),
            BLOCK_V=block_v(logits, BLOCK_V_STATISTICS),
            num_warps=NUM_WARPS,
        )
    return RowExtras(*out)


def gradient(logits, state, targets, bias, norm: SoftmaxNorm, coefs: TokenGradCoefficients, head: HeadSpec):
    """dz over `logits` (the same tensor, overwritten; its dtype), log p from the rows' `norm` (max, log s)."""
    num_rows, vocab_size = logits.shape
    block = block_v(logits, BLOCK_V_GRADIENTS)
    if num_rows > 0:
        row_dz_kernel[(num_rows, triton.cdiv(vocab_size, block))](
            logits,
            targets_ptr=targets,
            V=vocab_size,
            stride_row=logits.stride(0),
            **coefficient_arguments(norm, coefs),
            **transform_arguments(bias, head),
            BLOCK_V=block,
            num_warps=NUM_WARPS,
        )
    return logits

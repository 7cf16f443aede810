"""Backward pass: recompute a logit tile, form dz from per-token coefficients, accumulate the gradients.

Grid (token blocks, vocabulary blocks). Per tile, with p = exp(z - lse):

    dz = onehot_coef * 1[v = y] + p * (prob_coef - logp_coef * log p) + uniform_coef
    dz *= (1 - (z / softcap)^2) / temperature          (chain through softcap and temperature)

then dhidden[n, :] += dz @ weight[v, :] and dweight[v, :] += dz.T @ hidden[n, :] (and dbias[v] += sum_n dz) are
added atomically into fp32 buffers, with relaxed ordering: the sums need atomicity, not the memory fences of the
default acq_rel (nothing reads them before the kernel ends). A block of ignored tokens returns at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..core import LogitTransform, TokenGradCoefficients
from .logit_tile import LaunchConfig, launch_config, logit_tile, tile_arguments

_HALF_CONFIG = LaunchConfig(block_n=128, block_v=128, block_d=64, num_warps=8, num_stages=3)
# fp32 tiles take twice the bytes: half the depth and a stage fewer keep the backward within sm_80's shared memory
# and cut the spills (benchmarks/compile_report.py).
CUDA_CONFIGS = {
    torch.float16: _HALF_CONFIG,
    torch.bfloat16: _HALF_CONFIG,
    torch.float32: LaunchConfig(block_n=128, block_v=128, block_d=32, num_warps=8, num_stages=2),
}


@triton.jit
def token_statistics_backward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    lse_ptr,
    onehot_coef_ptr,
    prob_coef_ptr,
    logp_coef_ptr,
    uniform_coef_ptr,
    d_hidden_ptr,  # [N, D] fp32, zero-initialised
    d_weight_ptr,  # [V, D] fp32, zero-initialised
    d_bias_ptr,  # [V] fp32, zero-initialised
    N,
    V,
    D,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    inv_temperature,
    softcap,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LOGP_COEF: tl.constexpr,
    HAS_UNIFORM_COEF: tl.constexpr,
    COMPUTE_D_HIDDEN: tl.constexpr,
    COMPUTE_D_WEIGHT: tl.constexpr,
    COMPUTE_D_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IN_INTERPRETER: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=ignore_index)
    active = mask_n & (targets != ignore_index)
    if tl.max(active.to(tl.int32), axis=0) == 0:
        return

    z = logit_tile(
        hidden_ptr,
        weight_ptr,
        bias_ptr,
        offs_n,
        offs_v,
        mask_n,
        mask_v,
        D,
        stride_hn,
        stride_hd,
        stride_wv,
        stride_wd,
        inv_temperature,
        softcap,
        HAS_BIAS,
        HAS_SOFTCAP,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
        DOT_PRECISION,
        IN_INTERPRETER,
    )
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    onehot_coef = tl.load(onehot_coef_ptr + offs_n, mask=mask_n, other=0.0)
    prob_coef = tl.load(prob_coef_ptr + offs_n, mask=mask_n, other=0.0)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    if HAS_LOGP_COEF:
        logp_coef = tl.load(logp_coef_ptr + offs_n, mask=mask_n, other=0.0)
        d_z = p * (prob_coef[:, None] - logp_coef[:, None] * log_p)
    else:
        d_z = p * prob_coef[:, None]
    if HAS_UNIFORM_COEF:
        d_z += tl.load(uniform_coef_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    d_z += tl.where(offs_v[None, :] == targets[:, None], onehot_coef[:, None], 0.0)
    if HAS_SOFTCAP:
        capped = z / softcap
        d_z = d_z * (1.0 - capped * capped)
    d_z = tl.where(active[:, None] & mask_v[None, :], d_z * inv_temperature, 0.0)

    if COMPUTE_D_BIAS:
        tl.atomic_add(d_bias_ptr + offs_v, tl.sum(d_z, axis=0), mask=mask_v, sem="relaxed")

    d_z_in = d_z.to(hidden_ptr.dtype.element_ty)  # tensor-core operands in the input dtype, fp32 accumulation
    if IN_INTERPRETER:
        d_z_in = d_z_in.to(tl.float32)
    rows_h = offs_n.to(tl.int64)[:, None]
    rows_w = offs_v.to(tl.int64)[:, None]
    for d_start in range(0, D, BLOCK_D):
        offs_d = d_start + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        if COMPUTE_D_HIDDEN:
            w = tl.load(
                weight_ptr + rows_w * stride_wv + offs_d[None, :] * stride_wd,
                mask=mask_v[:, None] & mask_d[None, :],
                other=0.0,
            )
            if IN_INTERPRETER:
                w = w.to(tl.float32)
            d_h = tl.dot(d_z_in, w, input_precision=DOT_PRECISION)
            tl.atomic_add(d_hidden_ptr + rows_h * D + offs_d[None, :], d_h, mask=mask_n[:, None] & mask_d[None, :],
                          sem="relaxed")  # fmt: skip
        if COMPUTE_D_WEIGHT:
            h = tl.load(
                hidden_ptr + rows_h * stride_hn + offs_d[None, :] * stride_hd,
                mask=mask_n[:, None] & mask_d[None, :],
                other=0.0,
            )
            if IN_INTERPRETER:
                h = h.to(tl.float32)
            d_w = tl.dot(tl.trans(d_z_in), h, input_precision=DOT_PRECISION)
            tl.atomic_add(d_weight_ptr + rows_w * D + offs_d[None, :], d_w, mask=mask_v[:, None] & mask_d[None, :],
                          sem="relaxed")  # fmt: skip


def logit_gradients(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    coefs: TokenGradCoefficients,
    transform: LogitTransform,
    needs: tuple[bool, bool, bool],
):
    """(d_hidden, d_weight, d_bias), each None when not needed (its work compiled out), accumulated in fp32."""
    needs_hidden, needs_weight, needs_bias = needs
    num_tokens, dim = hidden.shape
    vocab_size = weight.shape[0]
    cfg = launch_config(hidden, CUDA_CONFIGS)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    d_hidden = torch.zeros(num_tokens, dim, **f32) if needs_hidden else None
    d_weight = torch.zeros(vocab_size, dim, **f32) if needs_weight else None
    d_bias = torch.zeros(vocab_size, **f32) if needs_bias else None
    if num_tokens > 0 and any(needs):
        grid = (triton.cdiv(num_tokens, cfg.block_n), triton.cdiv(vocab_size, cfg.block_v))
        token_statistics_backward_kernel[grid](
            targets_ptr=targets, lse_ptr=lse, onehot_coef_ptr=coefs.onehot_coef, prob_coef_ptr=coefs.prob_coef,
            logp_coef_ptr=coefs.logp_coef, uniform_coef_ptr=coefs.uniform_coef,
            d_hidden_ptr=d_hidden, d_weight_ptr=d_weight, d_bias_ptr=d_bias,
            N=num_tokens, V=vocab_size, ignore_index=transform.ignore_index,
            HAS_LOGP_COEF=coefs.logp_coef is not None, HAS_UNIFORM_COEF=coefs.uniform_coef is not None,
            COMPUTE_D_HIDDEN=needs_hidden, COMPUTE_D_WEIGHT=needs_weight, COMPUTE_D_BIAS=needs_bias,
            **tile_arguments(hidden, weight, bias, transform), **cfg.launch_options(),
        )  # fmt: skip
    return (
        None if d_hidden is None else d_hidden.to(hidden.dtype),
        None if d_weight is None else d_weight.to(weight.dtype),
        None if d_bias is None else d_bias.to(bias.dtype),
    )

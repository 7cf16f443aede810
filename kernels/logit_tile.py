"""A [BLOCK_N, BLOCK_V] tile of z = softcap(F.linear(hidden, weight, bias) / temperature), in fp32, shared by both
passes, the online log-sum-exp update, the logits' gradient from the per-token coefficients (the tile backward's
and the chunked epilogue's), and the host side every launch shares: launch configs, the fp32 dot precision and the
kernels' arguments."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..engine.backends import triton_interpreter_enabled
from ..engine.head import HeadSpec


class LaunchConfig(NamedTuple):
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"{self.block_n}x{self.block_v}x{self.block_d} w{self.num_warps} s{self.num_stages}"

    def launch_options(self) -> dict:
        return dict(
            BLOCK_N=self.block_n,
            BLOCK_V=self.block_v,
            BLOCK_D=self.block_d,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )


# Small tiles keep the CPU interpreter quick while still exercising multi-tile sweeps and masking.
INTERPRETER_CONFIG = LaunchConfig(block_n=16, block_v=32, block_d=16, num_warps=1, num_stages=1)


def in_interpreter(device: torch.device) -> bool:
    return device.type != "cuda" or triton_interpreter_enabled()


def launch_candidates(
    hidden: torch.Tensor, cuda_configs: dict[torch.dtype, tuple[LaunchConfig, ...]]
) -> tuple[LaunchConfig, ...]:
    """The interpreter's small tiles, or the pass's CUDA configs for the input dtype (the first is the default)."""
    return (INTERPRETER_CONFIG,) if in_interpreter(hidden.device) else cuda_configs[hidden.dtype]


def fp32_dot_precision() -> str:
    """How PyTorch's own CUDA matmuls treat fp32 inputs: "tf32" (tensor cores) or "ieee", from the new per-backend
    setting (torch >= 2.9) when it is set, else from `torch.get_float32_matmul_precision()` ("highest" = IEEE)."""
    for setting in (
        getattr(torch.backends.cuda.matmul, "fp32_precision", None),
        getattr(torch.backends, "fp32_precision", None),
    ):
        if setting in ("tf32", "ieee"):
            return setting
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def transform_arguments(bias, head: HeadSpec) -> dict:
    """The keyword arguments of transform_tile, under the names every kernel takes them by."""
    return dict(
        bias_ptr=bias,
        inv_temperature=1.0 / head.temperature,
        softcap=0.0 if head.softcap is None else float(head.softcap),
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=head.softcap is not None,
    )


def coefficient_arguments(norm, coefs) -> dict:
    """The keyword arguments of dz_of_logits' per-token inputs (core.SoftmaxNorm and core.TokenGradCoefficients),
    under the names both kernels that form dz take them by."""
    return dict(
        max_ptr=norm.max,
        log_sum_exp_ptr=norm.log_sum_exp,
        onehot_coef_ptr=coefs.onehot_coef,
        prob_coef_ptr=coefs.prob_coef,
        logp_coef_ptr=coefs.logp_coef,
        uniform_coef_ptr=coefs.uniform_coef,
        HAS_LOGP_COEF=coefs.logp_coef is not None,
        HAS_UNIFORM_COEF=coefs.uniform_coef is not None,
    )


def tile_arguments(hidden, weight, bias, head: HeadSpec) -> dict:
    """The keyword arguments of logit_tile that both tile kernels take under the same names."""
    return dict(
        hidden_ptr=hidden,
        weight_ptr=weight,
        D=hidden.shape[1],
        stride_hn=hidden.stride(0),
        stride_hd=hidden.stride(1),
        stride_wv=weight.stride(0),
        stride_wd=weight.stride(1),
        **transform_arguments(bias, head),
        # fp32 inputs follow PyTorch's matmul precision; the setting means nothing for half-precision inputs.
        DOT_PRECISION=fp32_dot_precision() if hidden.dtype == torch.float32 else None,
        IN_INTERPRETER=in_interpreter(hidden.device),
    )


@triton.jit
def logit_tile(
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
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IN_INTERPRETER: tl.constexpr,
):
    # int64 row offsets: N * D and V * D may exceed 2^31.
    rows_h = offs_n.to(tl.int64)[:, None] * stride_hn
    rows_w = offs_v.to(tl.int64)[:, None] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        offs_d = d_start + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(
            hidden_ptr + rows_h + offs_d[None, :] * stride_hd,
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        w = tl.load(
            weight_ptr + rows_w + offs_d[None, :] * stride_wd,
            mask=mask_v[:, None] & mask_d[None, :],
            other=0.0,
        )
        if IN_INTERPRETER:  # the CPU interpreter multiplies bfloat16 bit patterns as integers; fp32 is exact here
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return transform_tile(acc, bias_ptr, offs_v, mask_v, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def transform_tile(
    raw, bias_ptr, offs_v, mask_v, inv_temperature, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr
):
    """softcap((raw + bias) / temperature) of fp32 raw logits whose last axis holds the columns `offs_v`."""
    if HAS_BIAS:
        raw += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    raw = raw * inv_temperature
    if HAS_SOFTCAP:
        # softcap * tanh(raw / softcap), with tanh(x) = 1 - 2 / (exp(2x) + 1) (stable at both ends)
        raw = softcap * (1.0 - 2.0 / (tl.exp(2.0 * raw / softcap) + 1.0))
    return raw


@triton.jit
def raise_running_max(running_max, sum_exp, new_max):
    """(max_shift, rescale) of a running max raised to `new_max` >= it: max_shift = m_old - m_new (0 where nothing
    was summed yet, sum_exp = 0, so that -inf - m cannot reach the sums) and rescale = exp(max_shift)."""
    max_shift = tl.where(sum_exp > 0, running_max - new_max, 0.0)
    return max_shift, tl.exp(max_shift)


@triton.jit
def rescale_running_sums(sum_exp, sum_exp_shifted, max_shift, rescale):
    """s = sum exp(z - m) and a = sum exp(z - m) (z - m) taken to a new max m' = m - max_shift (core.rescale_to_max):
    s' = rescale * s, a' = rescale * (a + s * max_shift)."""
    return sum_exp * rescale, rescale * (sum_exp_shifted + sum_exp * max_shift)


@triton.jit
def online_log_sum_exp(lane_max, lane_sum_exp, lane_sum_exp_shifted, z, mask_v):
    """One block of the online log-sum-exp per lane: the running max raised, s and a rescaled, z added."""
    new_max = tl.where(mask_v, tl.maximum(lane_max, z), lane_max)
    max_shift, rescale = raise_running_max(lane_max, lane_sum_exp, new_max)
    lane_sum_exp, lane_sum_exp_shifted = rescale_running_sums(lane_sum_exp, lane_sum_exp_shifted, max_shift, rescale)
    shifted = tl.where(mask_v, z - new_max, 0.0)
    e = tl.where(mask_v, tl.exp(shifted), 0.0)
    return new_max, lane_sum_exp + e, lane_sum_exp_shifted + e * shifted


@triton.jit
def merge_lanes(lane_max, lane_sum_exp, lane_sum_exp_shifted):
    """The lanes' (m, s, a) shifted to the row's max and summed (lanes that saw no column hold s = 0, add 0)."""
    row_max = tl.max(lane_max, axis=0)
    lane_shift, lane_rescale = raise_running_max(lane_max, lane_sum_exp, row_max)
    lane_sum_exp, lane_sum_exp_shifted = rescale_running_sums(
        lane_sum_exp, lane_sum_exp_shifted, lane_shift, lane_rescale
    )
    return row_max, tl.sum(lane_sum_exp, axis=0), tl.sum(lane_sum_exp_shifted, axis=0)


@triton.jit
def dz_of_logits(
    z,
    row_max,
    log_sum_exp,
    is_target,
    onehot_coef,
    prob_coef,
    logp_coef,
    uniform_coef,
    inv_temperature,
    softcap,
    HAS_LOGP_COEF: tl.constexpr,
    HAS_UNIFORM_COEF: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """dz = onehot_coef * 1[v = y] + p * (prob_coef - logp_coef * log p) + uniform_coef (core.TokenGradCoefficients),
    chained through softcap and temperature, for transformed logits z, with log p = (z - m) - log s from the row's
    max logit m and log s (core.SoftmaxNorm); the per-token arguments broadcast against z (a tile's [BLOCK_N, 1]
    columns, or a row's scalars)."""
    # never z - lse (core.SoftmaxNorm says why); log p <= 0, also where a recomputed z exceeds m + log s by a rounding
    log_p = tl.minimum((z - row_max) - log_sum_exp, 0.0)
    p = tl.exp(log_p)
    if HAS_LOGP_COEF:
        d_z = p * (prob_coef - logp_coef * log_p)
    else:
        d_z = p * prob_coef
    if HAS_UNIFORM_COEF:
        d_z += uniform_coef
    d_z += tl.where(is_target, onehot_coef, 0.0)
    return chain_to_raw_logits(d_z, z, inv_temperature, softcap, HAS_SOFTCAP)


@triton.jit
def chain_to_raw_logits(d_z, z, inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr):
    """A gradient with respect to the transformed logits z taken to the raw logits (core.chain_through_head)."""
    if HAS_SOFTCAP:  # d softcap(u)/du = 1 - (z / softcap)^2
        capped = z / softcap
        d_z = d_z * (1.0 - capped * capped)
    return d_z * inv_temperature

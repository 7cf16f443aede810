"""Backward pass: recompute a logit tile, form dz from per-token coefficients, accumulate the gradients.

A 1-D grid over (token block, vocabulary block) tiles in grouped order (GROUP_N token blocks at a time). Per tile,
with log p = (z - m) - log s from each token's max logit m and log s (core.SoftmaxNorm; never z - lse):

    dz = onehot_coef * 1[v = y] + p * (prob_coef - logp_coef * log p) + uniform_coef
    dz *= (1 - (z / softcap)^2) / temperature          (chain through softcap and temperature)

then dhidden[n, :] += dz @ weight[v, :] and dweight[v, :] += dz.T @ hidden[n, :] (and dbias[v] += sum_n dz) are
added atomically into fp32 buffers, with relaxed ordering: the sums need atomicity, not the memory fences of the
default acq_rel (nothing reads them before the kernel ends). A block of ignored tokens returns at once; with
gradient filtering on, so does a tile whose every |dz| is below the threshold times its token's gradient scale.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..engine.core import SoftmaxNorm, TokenGradCoefficients
from ..engine.head import HeadSpec
from .autotune import run_tuned, tokens_bucket
from .logit_tile import (
    LaunchConfig,
    coefficient_arguments,
    dz_of_logits,
    launch_candidates,
    logit_tile,
    tile_arguments,
)

# Spill-free on sm_80 and sm_90a with Triton 3.6 and 3.9 (benchmarks/compile_report.py --check); the first of each
# list is the default, the rest are timed on CUDA (autotune.py). A 128 x 128 tile spills: dz, the gradient blocks
# and the operands of two dots are live together. fp32 tiles take twice the bytes per element.
_HALF_CONFIGS = (
    LaunchConfig(block_n=128, block_v=64, block_d=32, num_warps=8, num_stages=3),
    LaunchConfig(block_n=64, block_v=128, block_d=32, num_warps=8, num_stages=3),
    LaunchConfig(block_n=64, block_v=64, block_d=32, num_warps=4, num_stages=2),
)
CUDA_CONFIGS = {
    torch.float16: _HALF_CONFIGS,
    torch.bfloat16: _HALF_CONFIGS,
    torch.float32: (LaunchConfig(block_n=64, block_v=64, block_d=32, num_warps=8, num_stages=2),),
}
# Token blocks per launch group: a wave of programs covers GROUP_N token blocks times (wave / GROUP_N) vocabulary
# blocks, so the hidden / d_hidden rows and the weight / d_weight rows it touches stay in L2.
GROUP_N = 8


@triton.jit
def token_statistics_backward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    max_ptr,  # [N] each token's max logit m
    log_sum_exp_ptr,  # [N] log sum exp(z - m)
    onehot_coef_ptr,
    prob_coef_ptr,
    logp_coef_ptr,
    uniform_coef_ptr,
    d_hidden_ptr,  # [N, D] fp32, zero-initialised
    d_weight_ptr,  # [V, D] fp32, zero-initialised
    d_bias_ptr,  # [V] fp32, zero-initialised
    tile_counts_ptr,  # [2] int32, zero-initialised: tiles with a loss token, tiles kept by the filter
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
    filter_threshold,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LOGP_COEF: tl.constexpr,
    HAS_UNIFORM_COEF: tl.constexpr,
    COMPUTE_D_HIDDEN: tl.constexpr,
    COMPUTE_D_WEIGHT: tl.constexpr,
    COMPUTE_D_BIAS: tl.constexpr,
    FILTER: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IN_INTERPRETER: tl.constexpr,
):
    # Grouped launch order: GROUP_N token blocks at a time, every vocabulary block of the group before the next.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_N * tl.cdiv(V, BLOCK_V)
    first_pid_n = (pid // programs_per_group) * GROUP_N
    group_rows = tl.minimum(num_pid_n - first_pid_n, GROUP_N)
    pid_n = first_pid_n + (pid % programs_per_group) % group_rows
    pid_v = (pid % programs_per_group) // group_rows
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
    row_max = tl.load(max_ptr + offs_n, mask=mask_n, other=0.0)
    log_sum_exp = tl.load(log_sum_exp_ptr + offs_n, mask=mask_n, other=0.0)
    onehot_coef = tl.load(onehot_coef_ptr + offs_n, mask=mask_n, other=0.0)
    prob_coef = tl.load(prob_coef_ptr + offs_n, mask=mask_n, other=0.0)
    logp_coef = tl.load(logp_coef_ptr + offs_n, mask=mask_n, other=0.0) if HAS_LOGP_COEF else 0.0
    uniform_coef = tl.load(uniform_coef_ptr + offs_n, mask=mask_n, other=0.0) if HAS_UNIFORM_COEF else 0.0
    d_z = dz_of_logits(
        z,
        row_max[:, None],
        log_sum_exp[:, None],
        offs_v[None, :] == targets[:, None],
        onehot_coef[:, None],
        prob_coef[:, None],
        logp_coef[:, None] if HAS_LOGP_COEF else 0.0,
        uniform_coef[:, None] if HAS_UNIFORM_COEF else 0.0,
        inv_temperature,
        softcap,
        HAS_LOGP_COEF,
        HAS_UNIFORM_COEF,
        HAS_SOFTCAP,
    )
    d_z = tl.where(active[:, None] & mask_v[None, :], d_z, 0.0)

    if COMPUTE_D_BIAS:
        tl.atomic_add(d_bias_ptr + offs_v, tl.sum(d_z, axis=0), mask=mask_v, sem="relaxed")
    if FILTER:
        # Gradient filtering: the tile's GEMM work is skipped when every |dz| is below the threshold times its
        # token's gradient scale (the sum of its coefficient magnitudes, through the temperature). The test is on
        # dz itself, after the upstream weights and the entropy term, not on |p - onehot|.
        token_scale = tl.abs(onehot_coef) + tl.abs(prob_coef)
        if HAS_LOGP_COEF:
            token_scale += tl.abs(logp_coef)
        above = tl.abs(d_z) > (filter_threshold * inv_temperature) * token_scale[:, None]
        keep = tl.max(tl.max(above.to(tl.int32), axis=1), axis=0)
        tl.atomic_add(tile_counts_ptr, 1, sem="relaxed")
        tl.atomic_add(tile_counts_ptr + 1, keep, sem="relaxed")
        if keep == 0:
            return

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
            tl.atomic_add(
                d_hidden_ptr + rows_h * D + offs_d[None, :], d_h, mask=mask_n[:, None] & mask_d[None, :], sem="relaxed"
            )
        if COMPUTE_D_WEIGHT:
            h = tl.load(
                hidden_ptr + rows_h * stride_hn + offs_d[None, :] * stride_hd,
                mask=mask_n[:, None] & mask_d[None, :],
                other=0.0,
            )
            if IN_INTERPRETER:
                h = h.to(tl.float32)
            d_w = tl.dot(tl.trans(d_z_in), h, input_precision=DOT_PRECISION)
            tl.atomic_add(
                d_weight_ptr + rows_w * D + offs_d[None, :], d_w, mask=mask_v[:, None] & mask_d[None, :], sem="relaxed"
            )


class TileGradients(NamedTuple):
    """One launch's results: each gradient None when not needed (its work compiled out); `tile_counts` is
    [tiles with a loss token, tiles kept] (int32) when gradient filtering ran, else None."""

    d_hidden: torch.Tensor | None
    d_weight: torch.Tensor | None
    d_bias: torch.Tensor | None
    tile_counts: torch.Tensor | None


class FilteredTiles:
    """Tiles seen and kept by gradient filtering while it is active (see `count_filtered_tiles`)."""

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None  # int64 [tiles with a loss token, tiles kept], on the device

    @property
    def kept_fraction(self) -> float:
        if self.counts is None or int(self.counts[0]) == 0:
            raise RuntimeError("no filtered backward ran inside count_filtered_tiles()")
        return int(self.counts[1]) / int(self.counts[0])


_ACTIVE_COUNTERS: list[FilteredTiles] = []


@contextlib.contextmanager
def count_filtered_tiles():
    """Sum the filtering counts of every tile-kernel backward run inside the block (a diagnostic for benchmarks:
    the fraction of tiles whose GEMM work ran)."""
    counter = FilteredTiles()
    _ACTIVE_COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _ACTIVE_COUNTERS.remove(counter)


def tile_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    norm: SoftmaxNorm,
    coefs: TokenGradCoefficients,
    head: HeadSpec,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dhidden, dweight, dbias), each None when not needed: accumulated in fp32 and returned in the input dtypes
    (the filtering counts go to any active `count_filtered_tiles`). Gradient filtering
    (`head.gradient_filter`) runs unless a uniform term (label smoothing) reaches every column: skipping a
    tile would drop its share of that term, which sums to a constant fraction of the gradient over the vocabulary."""
    needs_hidden, needs_weight, needs_bias = needs
    num_tokens, dim = hidden.shape
    vocab_size = weight.shape[0]
    filtering = head.gradient_filter is not None and coefs.uniform_coef is None
    arguments = tile_arguments(hidden, weight, bias, head)

    def launch(cfg: LaunchConfig) -> TileGradients:
        f32 = dict(dtype=torch.float32, device=hidden.device)
        d_hidden = torch.zeros(num_tokens, dim, **f32) if needs_hidden else None
        d_weight = torch.zeros(vocab_size, dim, **f32) if needs_weight else None
        d_bias = torch.zeros(vocab_size, **f32) if needs_bias else None
        tile_counts = torch.zeros(2, dtype=torch.int32, device=hidden.device) if filtering else None
        if num_tokens > 0 and any(needs):
            grid = (triton.cdiv(num_tokens, cfg.block_n) * triton.cdiv(vocab_size, cfg.block_v),)
            token_statistics_backward_kernel[grid](
                targets_ptr=targets,
                **coefficient_arguments(norm, coefs),
                d_hidden_ptr=d_hidden,
                d_weight_ptr=d_weight,
                d_bias_ptr=d_bias,
                tile_counts_ptr=tile_counts,
                N=num_tokens,
                V=vocab_size,
                ignore_index=head.ignore_index,
                filter_threshold=head.gradient_filter if filtering else 0.0,
                COMPUTE_D_HIDDEN=needs_hidden,
                COMPUTE_D_WEIGHT=needs_weight,
                COMPUTE_D_BIAS=needs_bias,
                FILTER=filtering,
                GROUP_N=GROUP_N,
                **arguments,
                **cfg.launch_options(),
            )
        return TileGradients(d_hidden, d_weight, d_bias, tile_counts)

    key = (
        hidden.dtype,
        tokens_bucket(num_tokens),
        vocab_size,
        dim,
        bias is not None,
        head.softcap is not None,
        needs,
        coefs.logp_coef is not None,
        coefs.uniform_coef is not None,
        filtering,
    )
    d_hidden, d_weight, d_bias, tile_counts = run_tuned(
        "backward", key, launch_candidates(hidden, CUDA_CONFIGS), launch
    )
    if tile_counts is not None:
        for counter in _ACTIVE_COUNTERS:
            counter.counts = tile_counts.long() if counter.counts is None else counter.counts + tile_counts
    return (
        None if d_hidden is None else d_hidden.to(hidden.dtype),
        None if d_weight is None else d_weight.to(weight.dtype),
        None if d_bias is None else d_bias.to(bias.dtype),
    )

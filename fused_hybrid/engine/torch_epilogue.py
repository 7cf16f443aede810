"""The chunked engine's epilogue in PyTorch operations, on any device and dtype (float64 included): each chunk's
logits reduced to the rows' statistics and, where a gradient is due, turned into dz (docs/objectives.md,
"Statistics core"). It keeps three fp32 buffers of the chunk's size (the transformed logits, z - max and
exp(z - max)) and reuses the last two for log p and dz. The Triton epilogue (fused_hybrid.kernels.logit_epilogue)
has the same interface."""

from __future__ import annotations

import torch

from .core import (
    RowExtras,
    SoftmaxNorm,
    TokenGradCoefficients,
    VocabPartials,
    chain_through_head,
    stats_dtype,
    transform_logits,
)
from .head import HeadSpec

# sum exp(z - m) * (z - m) is summed in this many column blocks (see row_dot)
ROW_DOT_BLOCKS = 8


def bytes_per_logit(dtype: torch.dtype) -> int:
    return dtype.itemsize + 3 * stats_dtype(dtype).itemsize


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a * b).sum(-1), as accurate (pairwise on the CPU, a tree on CUDA), with a temporary of one column block
    (1 / ROW_DOT_BLOCKS of a buffer) rather than of the chunk's size. A batched row-times-row dot product needs
    none but is one sequential fp32 sum over V on the CPU (6e-5 relative error at V = 49152), and a TF32 GEMM
    on CUDA where fp32 matmuls may use TF32."""
    width = max(1, -(-a.shape[1] // ROW_DOT_BLOCKS))
    total = a.new_zeros(a.shape[0])
    for start in range(0, a.shape[1], width):
        total += (a[:, start : start + width] * b[:, start : start + width]).sum(-1)
    return total


def statistics(logits, targets, bias, head: HeadSpec):
    """(VocabPartials of each row, the buffers `gradient` reuses). `targets` is -1 where a row's target is
    not a column of this weight."""
    z = transform_logits(logits, bias, head)
    row_max = z.amax(-1)
    shifted = z - row_max[:, None]
    exp_shifted = torch.exp(shifted)
    sum_exp = exp_shifted.sum(-1)
    sum_exp_shifted = row_dot(exp_shifted, shifted)
    has_target = targets >= 0
    target_logit = z.gather(1, torch.where(has_target, targets, 0)[:, None]).squeeze(1)
    partials = VocabPartials(row_max, sum_exp, sum_exp_shifted, z.sum(-1), torch.where(has_target, target_logit, 0))
    return partials, (z, shifted, exp_shifted, sum_exp)


def extras(logits, state, targets, bias, head: HeadSpec, row_max) -> RowExtras:
    """RowExtras of each row from `statistics`' buffers (before `gradient` reuses them)."""
    z, shifted, _, _ = state
    sum_exp_sq = torch.exp(2.0 * shifted).sum(-1)
    columns = torch.arange(z.shape[1], device=z.device)
    before = torch.where(columns[None, :] < targets[:, None], z, float("-inf")).amax(-1)
    return RowExtras(sum_exp_sq, before)


def gradient(logits, state, targets, bias, norm: SoftmaxNorm, coefs: TokenGradCoefficients, head: HeadSpec):
    """dz (fp32, [rows, V]) from the token coefficients (see core.TokenGradCoefficients); `state` is what
    `statistics` returned for these logits, or None in a backward that recomputed them, which forms
    log p = (z - m) - log s from the rows' `norm` (the full vocabulary's, for a vocab-parallel shard)."""
    if state is None:
        # log p = (z - m) - log s (core.SoftmaxNorm) <= 0 always; clamping also keeps exp finite for a token
        # never swept (m = 0, log s = 0), whose all-zero coefficients then give dz = 0, not inf * 0 = NaN.
        z = transform_logits(logits, bias, head)
        log_probs = torch.sub(z, norm.max[:, None]).sub_(norm.log_sum_exp[:, None]).clamp_(max=0.0)
        probs = torch.exp(log_probs)
    else:  # exp(z - max) / s = p, and (z - max) - log s = log p, in the statistics' own buffers
        z, shifted, probs, sum_exp = state
        if coefs.logp_coef is None:  # p * prob_coef in one pass
            probs.mul_((coefs.prob_coef / sum_exp)[:, None])
        else:
            probs.div_(sum_exp[:, None])
            log_probs = shifted.sub_(torch.log(sum_exp)[:, None]).clamp_(max=0.0)
    d_z = probs
    if coefs.logp_coef is not None:
        d_z.mul_(log_probs.mul_(-coefs.logp_coef[:, None]).add_(coefs.prob_coef[:, None]))
    elif state is None:
        d_z.mul_(coefs.prob_coef[:, None])
    if coefs.uniform_coef is not None:
        d_z.add_(coefs.uniform_coef[:, None])
    has_target = targets >= 0
    rows = torch.arange(d_z.shape[0], device=d_z.device)
    # one target per row: a plain indexed add, deterministic on every device
    d_z[rows, torch.where(has_target, targets, 0)] += torch.where(has_target, coefs.onehot_coef, 0.0).to(d_z.dtype)
    return chain_through_head(d_z, z, head)

"""Forward pass: per-token online log-sum-exp, entropy sums, sum of logits and target logit.

Grid (token blocks, vocabulary splits). Each program sweeps its split of V in BLOCK_V tiles and keeps, per token,
the running max m, s = sum exp(z - m), a = sum exp(z - m) * (z - m), sum z and z[y]. With these,
lse = m + log s and H = log s - a / s: both terms are small for a confident token, so the entropy does not come
from cancelling two large numbers (lse and E_p[z]). The host merges the splits the same way.
The target logit is picked by comparing column indices with y, so no memory is ever indexed by a target.
"""

import triton
import triton.language as tl

from .logit_tile import logit_tile


@triton.jit
def head_stats_forward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    partials_ptr,  # [5, splits, N] fp32: max m, sum exp(z - m), sum exp(z - m) * (z - m), sum z, z[y]
    N,
    V,
    D,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    vocab_per_split,
    inv_temperature,
    softcap,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=ignore_index)
    # A block of ignored tokens (a prompt, padding) sweeps no vocabulary at all.
    any_active = tl.max((targets != ignore_index).to(tl.int32), axis=0)

    v_begin = pid_split * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, V)
    v_end = tl.where(any_active > 0, v_end, v_begin)

    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_exp_shifted = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v_start in range(v_begin, v_end, BLOCK_V):
        offs_v = v_start + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
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
            UPCAST_DOT,
        )
        z = tl.where(mask_v[None, :], z, 0.0)
        new_max = tl.maximum(running_max, tl.max(tl.where(mask_v[None, :], z, float("-inf")), axis=1))
        max_shift = tl.where(sum_exp > 0, running_max - new_max, 0.0)  # 0 before the first tile
        rescale = tl.exp(max_shift)
        shifted = tl.where(mask_v[None, :], z - new_max[:, None], 0.0)
        e = tl.where(mask_v[None, :], tl.exp(shifted), 0.0)
        # sum exp(z - m_new) * (z - m_new) = rescale * (old sum + old sum_exp * (m_old - m_new)) + this tile
        sum_exp_shifted = rescale * (sum_exp_shifted + sum_exp * max_shift) + tl.sum(e * shifted, axis=1)
        sum_exp = sum_exp * rescale + tl.sum(e, axis=1)
        sum_z += tl.sum(z, axis=1)
        target_logit += tl.sum(tl.where(offs_v[None, :] == targets[:, None], z, 0.0), axis=1)
        running_max = new_max

    out = partials_ptr + pid_split.to(tl.int64) * N + offs_n
    plane = num_splits.to(tl.int64) * N
    tl.store(out, running_max, mask=mask_n)
    tl.store(out + plane, sum_exp, mask=mask_n)
    tl.store(out + 2 * plane, sum_exp_shifted, mask=mask_n)
    tl.store(out + 3 * plane, sum_z, mask=mask_n)
    tl.store(out + 4 * plane, target_logit, mask=mask_n)

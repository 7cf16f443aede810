"""Forward pass: per-token online log-sum-exp, entropy sums, sum of logits and target logit.

Grid (token blocks, vocabulary splits). Each program sweeps its split of V in BLOCK_V tiles and keeps, per token,
the running max m, s = sum exp(z - m), a = sum exp(z - m) * (z - m), sum z and z[y]. With these,
lse = m + log s and H = log s - a / s: both terms are small for a confident token, so the entropy does not come
from cancelling two large numbers (lse and E_p[z]). The host merges the splits the same way.
A split's running sums take one term per tile (hundreds to thousands of tiles per row for V ~ 10^5): they are kept
compensated (TwoSum, a high and a low part), so that their error does not grow with the number of tiles as a plain
fp32 running sum's does (10x that of PyTorch's pairwise sum at V = 16384).
The target logit is picked by comparing column indices with y, so no memory is ever indexed by a target.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..engine.core import VocabPartials, merge_partials
from ..engine.head import HeadSpec
from .autotune import run_tuned, tokens_bucket
from .logit_tile import (
    LaunchConfig,
    launch_candidates,
    logit_tile,
    raise_running_max,
    rescale_running_sums,
    tile_arguments,
)

# Spill-free on sm_80 and sm_90a with Triton 3.6 and 3.9 (benchmarks/compile_report.py --check; with the compensated
# running sums up to 255 registers on 3.9; tables in benchmarks/NOTES.md); the first of each list is the default, the
# rest are timed on CUDA (autotune.py). 128 x 128 tiles spill once the five running statistics are live beside the
# accumulator. fp32 tiles take twice the bytes per element.
_HALF_CONFIGS = (
    LaunchConfig(block_n=128, block_v=64, block_d=32, num_warps=8, num_stages=3),
    LaunchConfig(block_n=64, block_v=128, block_d=32, num_warps=8, num_stages=3),
)
CUDA_CONFIGS = {
    torch.float16: _HALF_CONFIGS,
    torch.bfloat16: _HALF_CONFIGS,
    torch.float32: (LaunchConfig(block_n=64, block_v=64, block_d=32, num_warps=8, num_stages=2),),
}


@triton.jit
def two_sum(a, b):
    """(s, e) with s = fl(a + b) and a + b = s + e exactly (Knuth's TwoSum: whichever of |a|, |b| is larger)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


@triton.jit
def token_statistics_forward_kernel(
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
    IN_INTERPRETER: tl.constexpr,
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
    # compensated running sums: the value is high + low
    sum_exp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_exp_low = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_exp_shifted = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_exp_shifted_low = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_z_low = tl.zeros((BLOCK_N,), dtype=tl.float32)
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
            IN_INTERPRETER,
        )
        z = tl.where(mask_v[None, :], z, 0.0)
        new_max = tl.maximum(running_max, tl.max(tl.where(mask_v[None, :], z, float("-inf")), axis=1))
        max_shift, rescale = raise_running_max(running_max, sum_exp, new_max)
        shifted = tl.where(mask_v[None, :], z - new_max[:, None], 0.0)
        e = tl.where(mask_v[None, :], tl.exp(shifted), 0.0)
        # the running sums (both parts) at the new max, then this tile's terms added (the rescaling is exact,
        # rescale = 1 and max_shift = 0, on every tile that does not raise the max)
        carried_exp, carried_shifted = rescale_running_sums(sum_exp, sum_exp_shifted, max_shift, rescale)
        sum_exp_low, sum_exp_shifted_low = rescale_running_sums(sum_exp_low, sum_exp_shifted_low, max_shift, rescale)
        sum_exp_shifted, error = two_sum(carried_shifted, tl.sum(e * shifted, axis=1))
        sum_exp_shifted_low += error
        sum_exp, error = two_sum(carried_exp, tl.sum(e, axis=1))
        sum_exp_low += error
        sum_z, error = two_sum(sum_z, tl.sum(z, axis=1))
        sum_z_low += error
        target_logit += tl.sum(tl.where(offs_v[None, :] == targets[:, None], z, 0.0), axis=1)
        running_max = new_max

    out = partials_ptr + pid_split.to(tl.int64) * N + offs_n
    plane = num_splits.to(tl.int64) * N
    tl.store(out, running_max, mask=mask_n)
    tl.store(out + plane, sum_exp + sum_exp_low, mask=mask_n)
    tl.store(out + 2 * plane, sum_exp_shifted + sum_exp_shifted_low, mask=mask_n)
    tl.store(out + 3 * plane, sum_z + sum_z_low, mask=mask_n)
    tl.store(out + 4 * plane, target_logit, mask=mask_n)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def vocabulary_partials(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    head: HeadSpec,
) -> VocabPartials:
    """Per-token sums over this weight's rows (see VocabPartials); the kernel's vocabulary splits are merged."""
    num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    if num_tokens == 0:
        return VocabPartials(*torch.zeros(5, 0, dtype=torch.float32, device=hidden.device))
    arguments = tile_arguments(hidden, weight, bias, head)

    def launch(cfg: LaunchConfig) -> torch.Tensor:
        token_blocks = triton.cdiv(num_tokens, cfg.block_n)
        vocab_tiles = triton.cdiv(vocab_size, cfg.block_v)
        # Split V across programs when there are too few token blocks to fill the device. Token blocks vary fastest
        # in the launch order, so the programs running together sweep the same weight tiles (L2 reuse).
        splits = min(vocab_tiles, max(1, triton.cdiv(_target_programs(hidden.device), token_blocks)))
        tiles_per_split = triton.cdiv(vocab_tiles, splits)
        splits = triton.cdiv(vocab_tiles, tiles_per_split)
        split_partials = torch.empty(5, splits, num_tokens, dtype=torch.float32, device=hidden.device)
        token_statistics_forward_kernel[(token_blocks, splits)](
            targets_ptr=targets,
            partials_ptr=split_partials,
            N=num_tokens,
            V=vocab_size,
            vocab_per_split=tiles_per_split * cfg.block_v,
            ignore_index=head.ignore_index,
            **arguments,
            **cfg.launch_options(),
        )
        return split_partials

    key = (
        hidden.dtype,
        tokens_bucket(num_tokens),
        vocab_size,
        hidden.shape[1],
        bias is not None,
        head.softcap is not None,
    )
    split_partials = run_tuned("forward", key, launch_candidates(hidden, CUDA_CONFIGS), launch)
    return merge_partials(VocabPartials(*split_partials))

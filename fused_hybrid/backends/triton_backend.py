"""Host side of the Triton kernels: launch configuration, split merging and gradient buffers."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from .._validation import triton_interpreter_enabled
from ..core import LogitTransform, TokenGradCoefficients, VocabPartials, merge_partials
from ..kernels.head_stats_backward import head_stats_backward_kernel
from ..kernels.head_stats_forward import head_stats_forward_kernel

DETERMINISTIC_BACKWARD = False  # fp32 atomics: the order of the additions varies run to run


class LaunchConfig(NamedTuple):
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


# Small tiles keep the CPU interpreter quick while still exercising multi-tile sweeps and masking.
INTERPRETER_CONFIG = LaunchConfig(block_n=16, block_v=32, block_d=16, num_warps=1, num_stages=1)
CUDA_FORWARD_CONFIG = LaunchConfig(block_n=128, block_v=128, block_d=64, num_warps=8, num_stages=3)
CUDA_BACKWARD_CONFIG = LaunchConfig(block_n=128, block_v=128, block_d=64, num_warps=8, num_stages=3)


def _config(device: torch.device, cuda_config: LaunchConfig) -> LaunchConfig:
    return INTERPRETER_CONFIG if device.type != "cuda" or triton_interpreter_enabled() else cuda_config


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def fp32_dot_precision() -> str:
    """How PyTorch's own CUDA matmuls treat fp32 inputs: "tf32" (tensor cores) or "ieee", from the new per-backend
    setting (torch >= 2.9) when it is set, else from `torch.get_float32_matmul_precision()` ("highest" = IEEE)."""
    for setting in (getattr(torch.backends.cuda.matmul, "fp32_precision", None),
                    getattr(torch.backends, "fp32_precision", None)):  # fmt: skip
        if setting in ("tf32", "ieee"):
            return setting
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _common_args(hidden, weight, transform: LogitTransform):
    on_interpreter = hidden.device.type != "cuda"
    return dict(
        HAS_SOFTCAP=transform.softcap is not None,
        # fp32 inputs follow PyTorch's matmul precision; the setting means nothing for half-precision inputs.
        DOT_PRECISION=fp32_dot_precision() if hidden.dtype == torch.float32 else None,
        UPCAST_DOT=on_interpreter,
    ), (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))


def partials(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    transform: LogitTransform,
) -> VocabPartials:
    """Per-token sums over this weight's rows (see VocabPartials); the kernel's vocabulary splits are merged."""
    num_tokens, dim = hidden.shape
    vocab_size = weight.shape[0]
    if num_tokens == 0:
        return VocabPartials(*torch.zeros(5, 0, dtype=torch.float32, device=hidden.device))
    cfg = _config(hidden.device, CUDA_FORWARD_CONFIG)
    token_blocks = triton.cdiv(num_tokens, cfg.block_n)
    vocab_tiles = triton.cdiv(vocab_size, cfg.block_v)
    # Split V across programs when there are too few token blocks to fill the device.
    splits = min(vocab_tiles, max(1, triton.cdiv(_target_programs(hidden.device), token_blocks)))
    tiles_per_split = triton.cdiv(vocab_tiles, splits)
    splits = triton.cdiv(vocab_tiles, tiles_per_split)

    split_partials = torch.empty(5, splits, num_tokens, dtype=torch.float32, device=hidden.device)
    flags, strides = _common_args(hidden, weight, transform)
    head_stats_forward_kernel[(token_blocks, splits)](
        hidden,
        weight,
        bias,
        targets,
        split_partials,
        num_tokens,
        vocab_size,
        dim,
        *strides,
        tiles_per_split * cfg.block_v,
        1.0 / transform.temperature,
        0.0 if transform.softcap is None else float(transform.softcap),
        transform.ignore_index,
        HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n,
        BLOCK_V=cfg.block_v,
        BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **flags,
    )
    return merge_partials(VocabPartials(*split_partials))


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    coefs: TokenGradCoefficients,
    transform: LogitTransform,
    needs: tuple[bool, bool, bool],
):
    needs_hidden, needs_weight, needs_bias = needs
    num_tokens, dim = hidden.shape
    vocab_size = weight.shape[0]
    cfg = _config(hidden.device, CUDA_BACKWARD_CONFIG)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    d_hidden = torch.zeros(num_tokens, dim, **f32) if needs_hidden else None
    d_weight = torch.zeros(vocab_size, dim, **f32) if needs_weight else None
    d_bias = torch.zeros(vocab_size, **f32) if needs_bias else None
    flags, strides = _common_args(hidden, weight, transform)
    if num_tokens > 0 and any(needs):
        grid = (triton.cdiv(num_tokens, cfg.block_n), triton.cdiv(vocab_size, cfg.block_v))
        head_stats_backward_kernel[grid](
            hidden,
            weight,
            bias,
            targets,
            lse,
            coefs.onehot_coef,
            coefs.prob_coef,
            coefs.logp_coef,
            coefs.uniform_coef,
            d_hidden,
            d_weight,
            d_bias,
            num_tokens,
            vocab_size,
            dim,
            *strides,
            1.0 / transform.temperature,
            0.0 if transform.softcap is None else float(transform.softcap),
            transform.ignore_index,
            HAS_BIAS=bias is not None,
            HAS_LOGP_COEF=coefs.logp_coef is not None,
            HAS_UNIFORM_COEF=coefs.uniform_coef is not None,
            COMPUTE_D_HIDDEN=needs_hidden,
            COMPUTE_D_WEIGHT=needs_weight,
            COMPUTE_D_BIAS=needs_bias,
            BLOCK_N=cfg.block_n,
            BLOCK_V=cfg.block_v,
            BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **flags,
        )
    return (
        None if d_hidden is None else d_hidden.to(hidden.dtype),
        None if d_weight is None else d_weight.to(weight.dtype),
        None if d_bias is None else d_bias.to(bias.dtype),
    )

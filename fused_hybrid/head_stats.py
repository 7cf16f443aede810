"""The logits-free core: per-token statistics of `softcap(F.linear(hidden, weight, bias) / temperature)`.

For each token t with logits row z (never materialised beyond a tile or chunk) this computes

    logp_t  = z[y_t] - lse_t                       (target log-prob)
    H_t     = lse_t - sum_v softmax(z)_v * z_v     (entropy)
    lse_t   = logsumexp(z)
    sumz_t  = sum_v z_v                            (label smoothing needs mean_v z_v)

and, in backward, turns the per-token upstream gradients into dhidden / dweight / dbias by recomputing logit
tiles. Every objective of LOSSES.md reaches the logits only through these statistics.

Backends: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (chunked PyTorch, any device) and
"reference" (full logits and plain autograd; for tests and baselines only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._validation import check_head_inputs, check_targets_in_range, resolve_backend


class HeadStats(NamedTuple):
    """Per-token statistics, each of shape [N] in fp32 (fp64 for fp64 inputs), 0 at ignored tokens."""

    logp: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor
    sum_z: torch.Tensor


@dataclass(frozen=True)
class LogitTransform:
    """z = softcap(F.linear(hidden, weight, bias) / temperature); softcap(u) = s * tanh(u / s)."""

    temperature: float = 1.0
    softcap: float | None = None
    ignore_index: int = -100


class TokenGradCoefficients(NamedTuple):
    """dz_v = onehot_coef * 1[v = y] + p_v * (prob_coef - logp_coef * log p_v) + uniform_coef.

    `logp_coef` and `uniform_coef` are None when their statistic received no gradient (skipped work).
    """

    onehot_coef: torch.Tensor
    prob_coef: torch.Tensor
    logp_coef: torch.Tensor | None
    uniform_coef: torch.Tensor | None


def token_grad_coefficients(
    grads: tuple[torch.Tensor | None, ...], entropy: torch.Tensor, valid: torch.Tensor
) -> TokenGradCoefficients:
    """Fold the upstream gradients of (logp, H, lse, sum_z) into the per-token coefficients of dz.

    With p = softmax(z) (LOSSES.md, preamble):
        dlogp/dz_v = 1[v = y] - p_v
        dH/dz_v    = -p_v * (log p_v + H)
        dlse/dz_v  = p_v
        dsumz/dz_v = 1
    so dz_v = g_logp * 1[v = y] + p_v * (g_lse - g_logp - g_H * H - g_H * log p_v) + g_sumz.
    The entropy term is kept in log p_v = z_v - lse rather than z_v, so a confident token (log p_v ~ 0, z_v ~ lse)
    does not lose its gradient to cancellation between large logits. Ignored tokens get all-zero coefficients.
    """
    g_logp, g_entropy, g_lse, g_sum_z = grads
    zero = torch.zeros_like(entropy)
    g_logp = zero if g_logp is None else g_logp
    prob_coef = -g_logp
    if g_lse is not None:
        prob_coef = prob_coef + g_lse
    logp_coef = None
    if g_entropy is not None:
        prob_coef = prob_coef - g_entropy * entropy
        logp_coef = torch.where(valid, g_entropy, zero)
    uniform_coef = None if g_sum_z is None else torch.where(valid, g_sum_z, zero)
    return TokenGradCoefficients(
        onehot_coef=torch.where(valid, g_logp, zero).contiguous(),
        prob_coef=torch.where(valid, prob_coef, zero).contiguous(),
        logp_coef=None if logp_coef is None else logp_coef.contiguous(),
        uniform_coef=None if uniform_coef is None else uniform_coef.contiguous(),
    )


def stats_dtype(input_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def transform_logits(raw: torch.Tensor, bias: torch.Tensor | None, transform: LogitTransform) -> torch.Tensor:
    """Apply bias, temperature and softcap to raw logits `F.linear(hidden, weight)`, in the stats dtype."""
    z = raw.to(stats_dtype(raw.dtype))
    if bias is not None:
        z = z + bias.to(z.dtype)
    if transform.temperature != 1.0:
        z = z / transform.temperature
    if transform.softcap is not None:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    return z


class _LinearHeadStats(torch.autograd.Function):
    """One autograd op for the logits-free backends; `impl` provides forward/backward passes."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, transform, impl):
        # The backends compute every token's statistics (ignored targets read as 0); the backward keeps each
        # token's true lse so that exp(z - lse) <= 1 even where the token's gradient is masked to zero.
        stats = impl.forward(hidden, weight, targets, bias, transform)
        ctx.save_for_backward(hidden, weight, targets, bias, stats.lse, stats.entropy)
        ctx.transform = transform
        ctx.impl = impl
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(targets)
        valid = targets != transform.ignore_index
        return tuple(torch.where(valid, statistic, 0.0) for statistic in stats)

    @staticmethod
    def backward(ctx, g_logp, g_entropy, g_lse, g_sum_z):
        hidden, weight, targets, bias, lse, entropy = ctx.saved_tensors
        needs_hidden, needs_weight, _, needs_bias, _, _ = ctx.needs_input_grad
        if all(g is None for g in (g_logp, g_entropy, g_lse, g_sum_z)):
            return None, None, None, None, None, None
        valid = targets != ctx.transform.ignore_index
        coefs = token_grad_coefficients((g_logp, g_entropy, g_lse, g_sum_z), entropy, valid)
        d_hidden, d_weight, d_bias = ctx.impl.backward(
            hidden,
            weight,
            targets,
            bias,
            lse,
            coefs,
            ctx.transform,
            needs=(needs_hidden, needs_weight, needs_bias and bias is not None),
        )
        return d_hidden, d_weight, None, d_bias, None, None


def linear_head_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
) -> HeadStats:
    """Validated entry to the core: returns HeadStats with the leading shape of `targets`."""
    check_head_inputs(hidden, weight, targets, bias, temperature=temperature, softcap=softcap)
    resolved = resolve_backend(backend, hidden)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_targets_in_range(targets, weight.shape[0], ignore_index)

    leading_shape = targets.shape
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    targets_1d = targets.reshape(-1).to(torch.int64).contiguous()
    transform = LogitTransform(temperature=float(temperature), softcap=softcap, ignore_index=ignore_index)

    if resolved == "reference":
        from .backends import reference

        stats = reference.head_stats(hidden_2d, weight, targets_1d, bias, transform)
    else:
        if resolved == "triton":
            from .backends import triton_backend as impl
        else:
            from .backends import torch_chunked as impl
        stats = HeadStats(*_LinearHeadStats.apply(hidden_2d, weight, targets_1d, bias, transform, impl))
    return HeadStats(*(s.reshape(leading_shape) for s in stats))

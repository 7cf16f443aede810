"""The math and types of the logits-free core: per-token statistics of `softcap(F.linear(hidden, weight, bias) /
temperature)`.

For each token t with logits row z (never materialised beyond a tile or chunk) this computes

    logp_t  = z[y_t] - lse_t                       (target log-prob)
    H_t     = lse_t - sum_v softmax(z)_v * z_v     (entropy)
    lse_t   = logsumexp(z)
    sumz_t  = sum_v z_v                            (label smoothing needs mean_v z_v)

and, in backward, turns the per-token upstream gradients into dhidden / dweight / dbias by recomputing logit
tiles. Every objective reaches the logits only through these statistics (docs/objectives.md, "Statistics core").

The backends (engine.backends) compute the vocabulary partials and the backward; the custom op (engine.custom_op)
finalises them; engine.entry is the validated entry. This module imports none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from .head import HeadSpec

# The target value whose positions are ignored unless told otherwise: PyTorch's cross-entropy default, and the label
# every transformers causal LM ignores.
IGNORE_INDEX = -100


class HeadStats(NamedTuple):
    """Per-token statistics, each of shape [N] in fp32 (fp64 for fp64 inputs), 0 at ignored tokens."""

    logp: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor
    sum_z: torch.Tensor


# What the chunked engine may hold per chunk (logits and epilogue temporaries) unless told: at most 1 GiB on a
# GPU, 256 MiB elsewhere; and within that, on a CPU, chunks of CPU_CHUNK_ROWS tokens. Measured on 2 CPU threads
# (fp32 log-probs + entropy, fwd+bwd, docs/verl.md): at V 8192, D 256, N 4096, 512-row chunks took 551 ms and
# 86 MiB, the fastest (256 rows) 518 ms, 2048 rows 721 ms and 380 MiB; at V 32768, D 1024, N 2048, 512 rows 3.88 s
# and 260 MiB, 2048 rows 3.76 s and 664 MiB, 256 rows 4.21 s. 512 rows is within 6% of the fastest at both. On a
# GPU the 1 GiB cap stays until a GPU has measured where its GEMMs stop gaining.
DEFAULT_WORKSPACE_BYTES = {"cuda": 1 << 30}
DEFAULT_WORKSPACE_BYTES_ELSEWHERE = 256 << 20
CPU_CHUNK_ROWS = 512


def default_workspace_bytes(device: torch.device) -> int:
    """The most a chunk may hold on `device` unless told."""
    return DEFAULT_WORKSPACE_BYTES.get(device.type, DEFAULT_WORKSPACE_BYTES_ELSEWHERE)


def default_chunk_bytes(device: torch.device, vocab_size: int, bytes_per_logit: int) -> int:
    """What a chunk holds on `device` unless told: CPU_CHUNK_ROWS rows of the vocabulary on a CPU, at most the
    device's workspace (default_workspace_bytes) everywhere."""
    cap = default_workspace_bytes(device)
    if device.type == "cpu":
        return min(cap, CPU_CHUNK_ROWS * vocab_size * bytes_per_logit)
    return cap


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

    With p = softmax(z) (docs/objectives.md, "Statistics core"):
        dlogp/dz_v = 1[v = y] - p_v
        dH/dz_v    = -p_v * (log p_v + H)
        dlse/dz_v  = p_v
        dsumz/dz_v = 1
    so dz_v = g_logp * 1[v = y] + p_v * (g_lse - g_logp - g_H * H - g_H * log p_v) + g_sumz.
    The entropy term is kept in log p_v = z_v - lse rather than z_v, so a confident token (log p_v ~ 0, z_v ~ lse)
    does not lose its gradient to cancellation between large logits; backends form it from SoftmaxNorm. Ignored
    tokens get all-zero coefficients.
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


def transform_logits(raw: torch.Tensor, bias: torch.Tensor | None, head: HeadSpec) -> torch.Tensor:
    """Apply bias, temperature and softcap to raw logits `F.linear(hidden, weight)`, in the stats dtype."""
    z = raw.to(stats_dtype(raw.dtype))
    if bias is not None:
        z = z + bias.to(z.dtype)
    if head.temperature != 1.0:
        z = z / head.temperature
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    return z


def chain_through_head(d_z: torch.Tensor, z: torch.Tensor, head: HeadSpec) -> torch.Tensor:
    """The gradient with respect to the transformed logits z taken (in place) to the raw logits: through the
    softcap (d softcap(u)/du = 1 - (z / s)^2) and the temperature."""
    if head.softcap is not None:
        d_z.mul_(1.0 - (z / head.softcap) ** 2)
    if head.temperature != 1.0:
        d_z.div_(head.temperature)
    return d_z


class VocabPartials(NamedTuple):
    """Per-token sums over one slice of the vocabulary (a tile range, a Triton split, a vocab-parallel shard),
    taken relative to the slice's own maximum logit m, each of shape [N] (or [K, N] for K slices):
    m, s = sum exp(z - m), a = sum exp(z - m) * (z - m), sum z, and z[y] (0 when y is outside the slice)."""

    max: torch.Tensor
    sum_exp: torch.Tensor
    sum_exp_shifted: torch.Tensor
    sum_z: torch.Tensor
    target_logit: torch.Tensor


class RowExtras(NamedTuple):
    """Two more per-token sums over the whole vocabulary, taken on demand (TRL's fused head asks for them):
    q = sum exp(2 (z - m)) with m the row's max logit, so that log sum p^2 = log q - 2 log s, and the largest logit
    of the columns before the target (-inf when there are none), so that the target is the arg-max (first maximum,
    as torch.argmax) when z[y] >= m and z[y] > that."""

    sum_exp_sq: torch.Tensor
    max_before_target: torch.Tensor


def rescale_to_max(partials: VocabPartials, token_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slice's (sum exp, sum exp * shifted) taken relative to the common maximum `token_max` >= its own.

    sum exp(z - M) = r s_k and sum exp(z - M) (z - M) = r (a_k + s_k (m_k - M)) with r = exp(m_k - M). A slice that
    saw no logits (a block of ignored tokens the kernel skipped: m_k = -inf, s_k = 0) contributes exactly 0; its
    terms are selected away, never multiplied by 0, so -inf - (-inf) cannot turn into NaN.
    """
    seen = partials.sum_exp != 0  # NaN counts as seen: a non-finite input must propagate, not vanish
    shift = torch.where(seen, partials.max - token_max, 0.0)
    rescale = torch.where(seen, torch.exp(shift), 0.0)
    return partials.sum_exp * rescale, rescale * (partials.sum_exp_shifted + partials.sum_exp * shift)


def common_max(slice_max: torch.Tensor) -> torch.Tensor:
    """The maximum over slices, 0 (not -inf) for a token no slice saw, so that its statistics stay finite."""
    return torch.where(slice_max == float("-inf"), 0.0, slice_max)


def merge_partials(partials: VocabPartials) -> VocabPartials:
    """Combine K slices ([K, N] each) into one ([N]): shift every slice's sums to the common maximum."""
    token_max = common_max(partials.max.amax(0))
    sum_exp, sum_exp_shifted = rescale_to_max(partials, token_max)
    return VocabPartials(
        max=token_max,
        sum_exp=sum_exp.sum(0),
        sum_exp_shifted=sum_exp_shifted.sum(0),
        sum_z=partials.sum_z.sum(0),
        target_logit=partials.target_logit.sum(0),
    )


class SoftmaxNorm(NamedTuple):
    """What a backward forms each row's log-probabilities from: log p = (z - max) - log_sum_exp, as log_softmax
    does, with max the row's max logit m and log_sum_exp = log s, s = sum exp(z - m) (each [N], the stats dtype).
    Never z - lse: lse = m + log s rounds away up to half an ulp of |lse| (2e-6 at |lse| ~ 50), which would move
    every p of the row and wipe out a confident token's 1 - p."""

    max: torch.Tensor
    log_sum_exp: torch.Tensor


def softmax_norm(partials: VocabPartials) -> SoftmaxNorm:
    """(m, log s) of each token from its (merged) partials; m = 0, log s = 0 for a token never swept (s = 0), as
    finalize_partials' lse = 0: its log p = z stays finite and its all-zero coefficients give dz = 0."""
    return SoftmaxNorm(partials.max, torch.log(torch.where(partials.sum_exp != 0, partials.sum_exp, 1.0)))


def finalize_partials(partials: VocabPartials) -> HeadStats:
    """lse = m + log s; H = log s - a / s (both small for a confident token: no cancellation); logp = z[y] - lse.

    A token whose vocabulary was never swept (s = 0: it sat in a skipped block of ignored tokens) gets finite
    statistics (lse = m = 0, H = 0, logp = z[y] = 0) rather than -inf / NaN, so that nothing downstream, a
    backward included, can turn it into NaN. The caller masks ignored tokens' statistics to 0. A backward forms
    log p from softmax_norm's (m, log s), not from lse.
    """
    row_max, log_sum_exp = softmax_norm(partials)
    lse = row_max + log_sum_exp
    return HeadStats(
        logp=partials.target_logit - lse,
        entropy=log_sum_exp - partials.sum_exp_shifted / torch.where(partials.sum_exp != 0, partials.sum_exp, 1.0),
        lse=lse,
        sum_z=partials.sum_z,
    )

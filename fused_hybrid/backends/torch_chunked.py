"""Chunked PyTorch backend: same semantics as the Triton kernels, any device, O(chunk x V) memory.

Tokens are processed in chunks whose logits fit in `CHUNK_ELEMENTS`; backward recomputes each chunk's logits
and accumulates dhidden / dweight / dbias (dweight and dbias in fp32).
"""

from __future__ import annotations

import torch

from ..core import LogitTransform, TokenGradCoefficients, VocabPartials, stats_dtype, transform_logits

CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in fp32
DETERMINISTIC_BACKWARD = True  # matmuls and reductions in a fixed order, one indexed add per row


def _chunks(num_tokens: int, vocab_size: int):
    rows = max(1, min(num_tokens, CHUNK_ELEMENTS // vocab_size))
    for start in range(0, num_tokens, rows):
        yield slice(start, min(start + rows, num_tokens))


def _targets_in_slice(targets: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(whether each target is a row of this weight, the targets with the others replaced by 0). A target that is
    ignored, or on another vocab-parallel shard, has no logit and no one-hot gradient here."""
    in_range = (targets >= 0) & (targets < vocab_size)
    return in_range, torch.where(in_range, targets, 0)


def partials(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    transform: LogitTransform,
) -> VocabPartials:
    """Per-token sums over this weight's rows (see VocabPartials), chunk by chunk of tokens."""
    num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    out = torch.empty(5, num_tokens, dtype=stats_dtype(hidden.dtype), device=hidden.device)
    in_range, safe_targets = _targets_in_slice(targets, vocab_size)
    for rows in _chunks(num_tokens, vocab_size):
        z = transform_logits(hidden[rows] @ weight.T, bias, transform)
        row_max = z.amax(-1)
        shifted = z - row_max[:, None]
        exp_shifted = shifted.exp()
        out[0, rows] = row_max
        out[1, rows] = exp_shifted.sum(-1)
        out[2, rows] = (exp_shifted * shifted).sum(-1)
        out[3, rows] = z.sum(-1)
        out[4, rows] = torch.where(in_range[rows], z.gather(1, safe_targets[rows, None]).squeeze(1), 0.0)
    return VocabPartials(*out)


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
    num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    acc_dtype = stats_dtype(hidden.dtype)
    # Gradients come back contiguous whatever the inputs' strides (the custom op's fake implementation says so).
    d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if needs_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if needs_weight else None
    d_bias = torch.zeros(vocab_size, dtype=acc_dtype, device=weight.device) if needs_bias else None
    in_range, safe_targets = _targets_in_slice(targets, vocab_size)
    onehot_coef = torch.where(in_range, coefs.onehot_coef, 0.0)

    for rows in _chunks(num_tokens, vocab_size):
        z = transform_logits(hidden[rows] @ weight.T, bias, transform)
        # log p <= 0 always; clamping also keeps exp finite for a token whose lse was never swept (a skipped block
        # of ignored tokens reads lse = 0), whose all-zero coefficients then give dz = 0, not inf * 0 = NaN.
        log_probs = (z - lse[rows, None]).clamp_(max=0.0)
        d_z = torch.exp(log_probs)
        if coefs.logp_coef is not None:
            d_z.mul_(coefs.prob_coef[rows, None] - coefs.logp_coef[rows, None] * log_probs)
        else:
            d_z.mul_(coefs.prob_coef[rows, None])
        if coefs.uniform_coef is not None:
            d_z.add_(coefs.uniform_coef[rows, None])
        # one target per row: a plain indexed add, deterministic on every device
        d_z[torch.arange(d_z.shape[0], device=d_z.device), safe_targets[rows]] += onehot_coef[rows].to(d_z.dtype)
        if transform.softcap is not None:  # d softcap(u)/du = 1 - tanh^2(u / s) = 1 - (z / s)^2
            d_z.mul_(1.0 - (z / transform.softcap) ** 2)
        if transform.temperature != 1.0:
            d_z.div_(transform.temperature)

        if d_bias is not None:
            d_bias += d_z.sum(0)
        d_z = d_z.to(hidden.dtype)
        if d_hidden is not None:
            d_hidden[rows] = d_z @ weight
        if d_weight is not None:
            d_weight += (d_z.T @ hidden[rows]).to(acc_dtype)

    return (
        d_hidden,
        None if d_weight is None else d_weight.to(weight.dtype),
        None if d_bias is None else d_bias.to(bias.dtype),
    )

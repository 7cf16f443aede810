"""Naive backend: materialises the full N x V logits and differentiates with plain autograd.

For tests and as the benchmark baseline only; it needs O(N * V) memory.
"""

from __future__ import annotations

import torch

from .core import HeadStats, transform_logits
from .head import HeadSpec


def head_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    head: HeadSpec,
) -> HeadStats:
    z = transform_logits(hidden @ weight.T, bias, head)
    valid = targets != head.ignore_index
    safe_targets = torch.where(valid, targets, 0)
    lse = torch.logsumexp(z, dim=-1)
    log_probs = z - lse[:, None]
    logp = log_probs.gather(1, safe_targets[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    sum_z = z.sum(-1)
    zero = torch.zeros_like(lse)
    return HeadStats(*(torch.where(valid, s, zero) for s in (logp, entropy, lse, sum_z)))

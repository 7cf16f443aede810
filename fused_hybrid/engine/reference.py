"""Naive backend: materialises the full N x V logits and differentiates with plain autograd.

For tests and as the benchmark baseline only; it needs O(N * V) memory.
"""

from __future__ import annotations

import math

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


def divergence_rows(hidden, weight, targets, bias, head: HeadSpec, teacher, beta: float):
    """engine.divergence's rows from both heads' full logits, differentiable (the teacher detached): the naive
    baseline of the distillation objective (docs/objectives.md, "Distillation")."""
    from .divergence import TopKTeacher
    from .divergence_core import DivergenceRows

    log_ps = torch.log_softmax(transform_logits(hidden @ weight.T, bias, head), dim=-1)
    ps = log_ps.exp()
    valid = targets != head.ignore_index
    logp = log_ps.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    entropy = -(ps * log_ps).sum(-1)
    if isinstance(teacher, TopKTeacher):
        log_ps_k = log_ps.gather(1, teacher.ids)
        pt_k = teacher.logp.exp()
        teacher_tail = (1 - pt_k.sum(-1)).clamp(min=0) * (teacher.ids.shape[1] < weight.shape[0])
        student_tail = 1 - log_ps_k.exp().sum(-1)
        # no bucket where the teacher leaves none: its logs are never formed there (k = V leaves the student's
        # 1 - sum p_s at 0 or below, whose log's gradient would be 0 * inf in the branch torch.where drops)
        has_tail = teacher_tail > 0
        logs = (torch.where(has_tail, t, 1.0).log() for t in (teacher_tail, student_tail))
        tail = torch.where(has_tail, teacher_tail * (next(logs) - next(logs)), 0.0)
        divergence = (pt_k * (teacher.logp - log_ps_k)).sum(-1) + tail
    else:
        teacher_logits = transform_logits(
            teacher.hidden.detach() @ teacher.weight.detach().T, teacher.bias, teacher.head
        )
        log_pt = torch.log_softmax(teacher_logits, dim=-1)
        if beta == 0.0:
            divergence = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
        elif beta == 1.0:
            divergence = (ps * (log_ps - log_pt)).sum(-1)
        else:
            log_m = torch.logsumexp(torch.stack([log_ps + math.log(1 - beta), log_pt + math.log(beta)]), dim=0)
            divergence = beta * (log_pt.exp() * (log_pt - log_m)).sum(-1) + (1 - beta) * (ps * (log_ps - log_m)).sum(-1)
    zero = torch.zeros_like(entropy)
    divergence, entropy, logp = (torch.where(valid, s, zero) for s in (divergence, entropy, logp))
    return DivergenceRows(divergence, entropy, logp, None, None, None)

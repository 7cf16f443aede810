"""The divergence engine's epilogue in PyTorch operations, on any device and dtype (float64 included): a chunk of the
student's logits and the teacher's (or the teacher's top-k log-probs) reduced to each row's divergence, the
student's entropy and target log-prob, and turned into the student's dz (docs/objectives.md, "Distillation").
The Triton epilogue (fused_hybrid.kernels.divergence_epilogue) has the same interface for two heads; the top-k
form runs here on every device."""

from __future__ import annotations

import math

import torch

from .core import SoftmaxNorm, chain_through_head, stats_dtype, transform_logits
from .divergence_core import DivergenceRows
from .head import HeadSpec
from .torch_epilogue import row_dot


def bytes_per_logit(student_dtype: torch.dtype, teacher_dtype: torch.dtype | None) -> int:
    """Both heads' logits (in the stats dtype), the buffers the epilogue holds per logit at its peak (z, log p and p
    of each row, the mixture's log m) and dz in the student's dtype."""
    teacher = 0 if teacher_dtype is None else 4 * stats_dtype(teacher_dtype).itemsize
    return 5 * stats_dtype(student_dtype).itemsize + student_dtype.itemsize + teacher


def log_softmax_with_norm(z: torch.Tensor) -> tuple[torch.Tensor, SoftmaxNorm]:
    """log p = (z - m) - log s, and the row's (m, log s) (core.SoftmaxNorm), in one buffer of z's size."""
    row_max = z.amax(-1)
    log_p = z - row_max[:, None]
    log_sum_exp = torch.log(torch.exp(log_p).sum(-1))
    return log_p.sub_(log_sum_exp[:, None]), SoftmaxNorm(row_max, log_sum_exp)


def log_mixture(log_ps: torch.Tensor, log_pt: torch.Tensor, beta: float) -> torch.Tensor:
    """log m, m = (1 - beta) p_s + beta p_t, without forming p_s or p_t (no underflow of either)."""
    return torch.logaddexp(log_ps + math.log1p(-beta), log_pt + math.log(beta))


def _student_row(logits, targets, bias, head: HeadSpec):
    z = transform_logits(logits, bias, head)
    log_ps, norm = log_softmax_with_norm(z)
    has_target = targets >= 0
    logp = torch.where(has_target, log_ps.gather(1, torch.where(has_target, targets, 0)[:, None]).squeeze(1), 0.0)
    return z, log_ps, norm, logp


def statistics(s_logits, t_logits, targets, s_bias, t_bias, s_head: HeadSpec, t_head: HeadSpec, beta: float):
    """(DivergenceRows, the buffers `gradient` reuses) of a chunk: student logits [rows, V], teacher logits
    [rows, V]; `targets` is -1 where a row has no target column (no hard term)."""
    z, log_ps, s_norm, logp = _student_row(s_logits, targets, s_bias, s_head)
    log_pt, t_norm = log_softmax_with_norm(transform_logits(t_logits, t_bias, t_head))
    ps = torch.exp(log_ps)
    entropy = -row_dot(ps, log_ps)
    if beta == 0.0:  # KL(p_t || p_s)
        divergence = row_dot(torch.exp(log_pt), log_pt - log_ps)
        aux = torch.zeros_like(divergence)
    elif beta == 1.0:  # KL(p_s || p_t); its gradient needs the row's KL
        divergence = row_dot(ps, log_ps - log_pt)
        aux = divergence
    else:  # beta KL(p_t || m) + (1 - beta) KL(p_s || m); its gradient needs KL(p_s || m)
        log_m = log_mixture(log_ps, log_pt, beta)
        aux = row_dot(ps, log_ps - log_m)
        divergence = beta * row_dot(torch.exp(log_pt), log_pt.sub_(log_m)) + (1.0 - beta) * aux
        log_pt = None  # overwritten: gradient() recomputes the mixture from the norms
    rows = DivergenceRows(divergence, entropy, logp, s_norm, t_norm, aux)
    return rows, (z, log_ps, ps, log_pt)


def gradient(
    s_logits,
    t_logits,
    state,
    targets,
    s_bias,
    t_bias,
    s_head,
    t_head,
    beta,
    rows: DivergenceRows,
    g_div,
    g_logp,
    *,
    dz_dtype,
):
    """dz of `g_div * divergence + g_logp * logp` over the student's logits ([rows, V] in `dz_dtype`); `state` is what
    `statistics` returned for these logits, or None in a backward that recomputed them (log p from `rows`' norms)."""
    if state is None:
        z = transform_logits(s_logits, s_bias, s_head)
        log_ps = (z - rows.student_norm.max[:, None]).sub_(rows.student_norm.log_sum_exp[:, None]).clamp_(max=0.0)
        ps, log_pt = torch.exp(log_ps), None
    else:
        z, log_ps, ps, log_pt = state
    if log_pt is None:
        log_pt = transform_logits(t_logits, t_bias, t_head)
        log_pt = (
            log_pt.sub_(rows.teacher_norm.max[:, None]).sub_(rows.teacher_norm.log_sum_exp[:, None]).clamp_(max=0.0)
        )
    g_div, g_logp = g_div[:, None], g_logp[:, None]
    if beta == 0.0:  # (p_s - p_t) g
        d_z = ps.sub(log_pt.exp_()).mul_(g_div)
    elif beta == 1.0:  # p_s (log p_s - log p_t - KL) g
        d_z = log_ps.sub(log_pt).sub_(rows.aux[:, None]).mul_(ps).mul_(g_div)
    else:  # (1 - beta) p_s (log p_s - log m - KL(p_s || m)) g
        log_m = log_mixture(log_ps, log_pt, beta)
        d_z = log_ps.sub(log_m).sub_(rows.aux[:, None]).mul_(ps).mul_((1.0 - beta) * g_div)
    d_z.sub_(ps.mul_(g_logp))  # the hard term: g_logp (1[v = y] - p_s)
    has_target = targets >= 0
    index = torch.arange(d_z.shape[0], device=d_z.device)
    d_z[index, torch.where(has_target, targets, 0)] += torch.where(has_target, g_logp[:, 0], 0.0).to(d_z.dtype)
    return chain_through_head(d_z, z, s_head).to(dz_dtype)


def topk_statistics(s_logits, targets, bias, head: HeadSpec, topk_ids, topk_logp):
    """(DivergenceRows, buffers) of a chunk against a top-k teacher: forward KL over the k ids `topk_ids` [rows, k]
    (the teacher's log-probs `topk_logp` there) plus the tail bucket (docs/objectives.md, "Distillation", top-k).
    The student's tail mass is summed over its columns outside the k ids (no 1 - sum cancellation); the teacher
    norm and `aux` are unused (zeros)."""
    z, log_ps, s_norm, logp = _student_row(s_logits, targets, bias, head)
    ps = torch.exp(log_ps)
    entropy = -row_dot(ps, log_ps)
    log_ps_k = log_ps.gather(1, topk_ids)
    ps_k = ps.gather(1, topk_ids)
    # the tail: sum of p_s outside the ids, with the k columns zeroed in place and then restored
    ps.scatter_(1, topk_ids, 0.0)
    student_tail = ps.sum(-1)
    ps.scatter_(1, topk_ids, ps_k)
    pt_k = torch.exp(topk_logp)
    # with k = V there is no tail, whatever the rounding of 1 - sum p_t
    teacher_tail = (1.0 - pt_k.sum(-1)).clamp_(min=0.0) if topk_ids.shape[1] < z.shape[1] else torch.zeros_like(z[:, 0])
    head_term = (pt_k * (topk_logp - log_ps_k)).sum(-1)
    # p log(p / q) with p = 0 is 0, whatever q (also q = 0)
    tail_term = torch.where(teacher_tail > 0, teacher_tail * (torch.log(teacher_tail) - torch.log(student_tail)), 0.0)
    zeros = torch.zeros_like(entropy)
    rows = DivergenceRows(head_term + tail_term, entropy, logp, s_norm, SoftmaxNorm(zeros, zeros), zeros)
    return rows, (z, ps, student_tail, teacher_tail, pt_k, ps_k)


def topk_gradient(state, targets, head: HeadSpec, topk_ids, g_div, g_logp, *, dz_dtype):
    """dz of `g_div * divergence + g_logp * logp` against a top-k teacher ([rows, V] in `dz_dtype`), from
    `topk_statistics`' buffers (docs/objectives.md, "Distillation", top-k). With P_t the teacher's mass on the ids,
    T_t, T_s the teacher's and the student's tail buckets and M = P_t + T_t (1 unless the given mass leaves no
    bucket: k = V, or P_t rounded above 1): dz_v = g (M p_s,v - p_t,v) on the ids, g p_s,v (M - T_t / T_s) off them."""
    z, ps, student_tail, teacher_tail, pt_k, ps_k = state
    total_mass = pt_k.sum(-1) + teacher_tail
    # T_t / T_s, 0 where the teacher leaves no tail (also when the student leaves none)
    tail_ratio = torch.where(teacher_tail > 0, teacher_tail / student_tail, 0.0)
    off_ids = g_div * (total_mass - tail_ratio)
    on_ids = g_div[:, None] * (total_mass[:, None] * ps_k - pt_k)
    d_z = ps.mul_((off_ids - g_logp)[:, None])
    d_z.scatter_(1, topk_ids, on_ids - g_logp[:, None] * ps_k)
    has_target = targets >= 0
    index = torch.arange(d_z.shape[0], device=d_z.device)
    d_z[index, torch.where(has_target, targets, 0)] += torch.where(has_target, g_logp, 0.0).to(d_z.dtype)
    return chain_through_head(d_z, z, head).to(dz_dtype)

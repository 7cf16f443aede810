"""Distillation (docs/objectives.md, "Distillation"): the student learns a teacher's next-token distribution, the
teacher given as its own head (hidden states and LM head, any width, the same vocabulary) or as its top-k
log-probs; forward KL, reverse KL or the generalized JSD between (TRL's `beta`), with an optional hard
cross-entropy term, all without either head's logits."""

from __future__ import annotations

import math
import numbers

import torch

from ..checks import check_non_negative, check_positive, check_tensor, fail_where
from ..engine.core import stats_dtype
from ..engine.divergence import TeacherHead, TopKTeacher
from ..engine.divergence_core import DivergenceRows, with_temperature
from ..engine.entry import linear_divergence_loss
from ..engine.head import HeadSpec
from ..reduction import check_num_items, divide_by_count, mean_count
from .registry import Objective, register
from .tokens import LossOutput, TokenLayout, objective_module

# How far above 1 the sum of a top-k teacher's probabilities may round (log-probs stored in fp32 or bf16 and
# exponentiated) before it is an error.
TOPK_MASS_TOLERANCE = 1e-3


def check_distill_options(*, beta: float, temperature: float, hard_weight: float, teacher_head) -> None:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0.0 <= beta <= 1.0:
        raise ValueError(
            f"beta must be a number in [0, 1] (0: forward KL(teacher || student), 1: reverse KL, between: the "
            f"generalized JSD), got {beta!r}"
        )
    check_positive("temperature", temperature)
    check_non_negative("hard_weight", hard_weight)
    if teacher_head is not None and not isinstance(teacher_head, HeadSpec):
        raise TypeError(f"teacher_head must be a fused_hybrid.HeadSpec or None, got {type(teacher_head).__name__}")


def distill_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
    teacher_topk_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    teacher_head: HeadSpec | None = None,
    loss_mask: torch.Tensor | None = None,
    num_items: int | torch.Tensor | None = None,
    head: HeadSpec | None = None,
    **head_options,
) -> LossOutput:
    """``L = (1/N_tok) sum_t m_t (D_t + hard_weight * CE_t)``, D_t the divergence between the student's and the
    teacher's next-token distributions at token t (docs/objectives.md, "Distillation").

    The teacher is either a head, ``teacher_hidden`` (the shape of `hidden` but its own width D_t),
    ``teacher_weight [V, D_t]`` (the student's V) and ``teacher_bias``, its logits formed as ``teacher_head`` says
    (temperature as a logit scale, softcap), or its top-k log-probs: ``teacher_topk_ids`` and
    ``teacher_topk_logp`` (``targets.shape + (k,)``: the ids, distinct, and the teacher's log-probs there from its
    full softmax) for the forward KL over the k ids plus one tail bucket. ``beta`` picks the divergence as TRL's
    ``ChunkedDivergenceFunction`` does: 0 the forward KL(teacher || student), 1 the reverse KL(student || teacher),
    between the generalized JSD with mixture ``m = (1 - beta) p_s + beta p_t`` (a top-k teacher takes 0 only).
    ``temperature`` divides both heads' logits after their own transforms (the student's only, for a top-k
    teacher, whose log-probs are taken as given); ``hard_weight`` adds that weight times the cross-entropy of the
    student's (tempered) distribution on ``targets``. Tokens whose target is ``ignore_index`` or whose ``loss_mask``
    is 0 are outside the loss; ``num_items`` replaces their count. The teacher receives no gradient.

    Metrics: ``divergence`` (mean over loss tokens), ``student_entropy`` and ``hard_loss`` (the mean
    cross-entropy, whatever ``hard_weight``).
    """
    check_distill_options(beta=beta, temperature=temperature, hard_weight=hard_weight, teacher_head=teacher_head)
    check_num_items(num_items)
    head = HeadSpec.resolve(head, head_options)
    layout = TokenLayout.read(targets, head, loss_mask=loss_mask)
    teacher = _teacher(
        hidden,
        weight,
        targets,
        layout,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        teacher_topk_ids,
        teacher_topk_logp,
        teacher_head,
        beta,
        temperature,
    )

    def loss_of_rows(rows: DivergenceRows):
        def total(per_token):
            return torch.where(layout.mask, per_token, 0.0).sum()

        tokens = layout.mask.sum()
        divergence, cross_entropy = total(rows.divergence), -total(rows.logp)
        loss = divide_by_count(divergence + hard_weight * cross_entropy, mean_count(tokens, num_items))
        metrics = {
            "divergence": divide_by_count(divergence.detach(), tokens),
            "student_entropy": divide_by_count(total(rows.entropy.detach()), tokens),
            "hard_loss": divide_by_count(cross_entropy.detach(), tokens),
        }
        return loss, metrics

    loss, metrics = linear_divergence_loss(
        loss_of_rows,
        hidden,
        weight,
        layout.head_targets,
        bias,
        teacher=teacher,
        beta=float(beta),
        head=with_temperature(head, temperature),
    )
    return LossOutput(loss, metrics)


def _teacher(
    hidden,
    weight,
    targets,
    layout: TokenLayout,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    topk_ids,
    topk_logp,
    teacher_head,
    beta,
    temperature,
):
    """The checked teacher: a TeacherHead with its hidden states [N, D_t], or a TopKTeacher [N, k]."""
    given_head = teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None
    given_topk = topk_ids is not None or topk_logp is not None
    if given_head == given_topk:
        raise ValueError(
            "give the teacher either as a head (teacher_hidden, teacher_weight, teacher_bias) or as its top-k "
            "log-probs (teacher_topk_ids, teacher_topk_logp), not " + ("both" if given_head else "neither")
        )
    check_tensor("hidden", hidden)
    check_tensor("weight", weight)
    if given_topk:
        if teacher_head is not None:
            raise ValueError("teacher_head transforms a teacher head's logits; a top-k teacher has none")
        if beta != 0.0:
            raise ValueError(
                f"a top-k teacher gives the forward KL only (beta=0): the reverse KL and the JSD need the teacher's "
                f"whole distribution; got beta={beta}"
            )
        return _topk_teacher(topk_ids, topk_logp, targets, layout, weight.shape[0], hidden)
    return _teacher_head(
        hidden, weight, targets, teacher_hidden, teacher_weight, teacher_bias, teacher_head, temperature
    )


def _teacher_head(hidden, weight, targets, teacher_hidden, teacher_weight, teacher_bias, teacher_head, temperature):
    check_tensor("teacher_hidden", teacher_hidden)
    check_tensor("teacher_weight", teacher_weight)
    check_tensor("teacher_bias", teacher_bias, optional=True)
    if teacher_weight.dim() != 2:
        raise ValueError(f"teacher_weight must have shape [V, D_t], got {tuple(teacher_weight.shape)}")
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"teacher_weight has {teacher_weight.shape[0]} rows (vocabulary entries) but the student's weight has "
            f"{weight.shape[0]}: distillation needs one vocabulary"
        )
    if teacher_hidden.shape != (*targets.shape, teacher_weight.shape[1]):
        raise ValueError(
            f"teacher_hidden must have shape targets.shape + (D_t,) = {(*targets.shape, teacher_weight.shape[1])} "
            f"(D_t = teacher_weight.shape[1]), got {tuple(teacher_hidden.shape)}"
        )
    if teacher_hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"teacher_hidden must be a floating tensor, got {teacher_hidden.dtype}")
    if teacher_weight.dtype != teacher_hidden.dtype:
        raise TypeError(
            f"teacher_weight dtype ({teacher_weight.dtype}) must match teacher_hidden dtype ({teacher_hidden.dtype})"
        )
    if teacher_bias is not None and (
        teacher_bias.shape != (weight.shape[0],) or teacher_bias.dtype != teacher_hidden.dtype
    ):
        raise ValueError(
            f"teacher_bias must have shape [V] = [{weight.shape[0]}] and teacher_hidden's dtype "
            f"({teacher_hidden.dtype}), got {tuple(teacher_bias.shape)} {teacher_bias.dtype}"
        )
    devices = {
        t.device
        for t in (hidden, teacher_hidden, teacher_weight) + ((teacher_bias,) if teacher_bias is not None else ())
    }
    if len(devices) > 1:
        raise ValueError(
            f"the teacher's tensors must be on the student's device {hidden.device}, got {sorted(map(str, devices))}"
        )
    head = with_temperature(teacher_head or HeadSpec(), temperature)
    return TeacherHead(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight, teacher_bias, head)


def _topk_teacher(ids, logp, targets, layout: TokenLayout, vocab_size: int, hidden) -> TopKTeacher:
    for name, value in (("teacher_topk_ids", ids), ("teacher_topk_logp", logp)):
        check_tensor(name, value)
    if ids.dim() != targets.dim() + 1 or ids.shape[:-1] != targets.shape or not 1 <= ids.shape[-1] <= vocab_size:
        raise ValueError(
            f"teacher_topk_ids must have shape targets.shape + (k,) = {(*targets.shape, 'k')} with 1 <= k <= V "
            f"({vocab_size}), got {tuple(ids.shape)}"
        )
    if logp.shape != ids.shape:
        raise ValueError(
            f"teacher_topk_logp must have the shape of teacher_topk_ids {tuple(ids.shape)}, got {tuple(logp.shape)}"
        )
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"teacher_topk_ids must be an integer tensor, got {ids.dtype}")
    if not logp.dtype.is_floating_point:
        raise TypeError(f"teacher_topk_logp must be a floating tensor (log-probs), got {logp.dtype}")
    if ids.device != hidden.device or logp.device != hidden.device:
        raise ValueError(f"the top-k teacher must be on the student's device {hidden.device}")
    k = ids.shape[-1]
    ids = ids.reshape(-1, k).to(torch.int64)
    logp = logp.reshape(-1, k).to(stats_dtype(hidden.dtype))
    in_loss = layout.mask[:, None]
    fail_where(
        in_loss & ((ids < 0) | (ids >= vocab_size)),
        f"teacher_topk_ids must lie in [0, V) = [0, {vocab_size}) at the loss tokens",
        lambda bad: f"found {ids[bad][0].item()}",
    )
    ordered = ids.sort(-1).values
    fail_where(
        layout.mask & (ordered[:, 1:] == ordered[:, :-1]).any(-1),
        "teacher_topk_ids must be distinct within a token (each id once)",
        lambda bad: f"token {bad.nonzero()[0].item()} repeats an id",
    )
    fail_where(
        in_loss & ~(logp <= 0.0) | in_loss & ~logp.isfinite(),
        "teacher_topk_logp must be finite log-probs <= 0 at the loss tokens",
        lambda bad: f"found {logp[bad][0].item()}",
    )
    mass = torch.where(layout.mask, torch.exp(logp).sum(-1), 0.0)
    fail_where(
        mass > 1.0 + TOPK_MASS_TOLERANCE,
        f"exp(teacher_topk_logp) must sum to at most 1 per token (the teacher's probabilities from its full "
        f"softmax; rounding up to {TOPK_MASS_TOLERANCE} allowed)",
        lambda bad: f"found a sum of {mass[bad][0].item():.6g}",
    )
    # tokens outside the loss carry any valid teacher (distinct ids, a uniform k-way distribution): never read
    filler_ids = torch.arange(k, device=ids.device).expand_as(ids)
    ids = torch.where(in_loss, ids, filler_ids)
    logp = torch.where(in_loss, logp, -math.log(k))
    return TopKTeacher(ids.contiguous(), logp.contiguous())


DistillLoss = objective_module("DistillLoss", distill_loss, check_distill_options)


def _trainer_options(config, step: int) -> dict:
    objective = config.objective
    return {
        "beta": objective.distill_beta,
        "temperature": objective.distill_temperature,
        "hard_weight": objective.hard_weight,
    }


DISTILL = register(
    Objective(
        name="distill",
        loss=distill_loss,
        # on-policy: the student's own samples, scored by the teacher; off-policy: the demonstrations, teacher-forced
        data=lambda config: "completions" if config.objective.distill_policy == "on" else "demonstrations",
        normalisers={"num_items": "tokens"},
        batch_inputs=("teacher_hidden", "teacher_weight", "teacher_bias", "teacher_head"),
        options=_trainer_options,
        needs_teacher=lambda config: True,
        metric_counts={"divergence": "tokens", "student_entropy": "tokens", "hard_loss": "tokens"},
    )
)

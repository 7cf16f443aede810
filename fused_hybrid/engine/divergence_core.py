"""The types and math the divergence engine's epilogues share (docs/objectives.md, "Distillation")."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from .core import SoftmaxNorm
from .head import HeadSpec


class DivergenceRows(NamedTuple):
    """Per-token results of the divergence sweep, each [N] in the stats dtype: the divergence, the student's
    entropy and target log-prob (0 without a target), each head's (max, log s) (core.SoftmaxNorm), and the row sum
    the student's gradient needs besides them (`aux`: KL(p_s || p_t) for beta = 1, KL(p_s || m) between, 0 for
    beta = 0 and against a top-k teacher)."""

    divergence: torch.Tensor
    entropy: torch.Tensor
    logp: torch.Tensor
    student_norm: SoftmaxNorm
    teacher_norm: SoftmaxNorm
    aux: torch.Tensor


def with_temperature(head: HeadSpec, temperature: float) -> HeadSpec:
    """`head` whose logits are further divided by the distillation `temperature` T: softcap_c(u / tau) / T is
    softcap_{c / T}(u / (tau T)), so T folds into the head's own temperature and softcap."""
    if temperature == 1.0:
        return head
    softcap = None if head.softcap is None else head.softcap / temperature
    return dataclasses.replace(head, temperature=head.temperature * temperature, softcap=softcap)

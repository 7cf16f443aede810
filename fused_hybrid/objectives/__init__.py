"""The hybrid SFT + RL objectives (docs/objectives.md), each a function (returning LossOutput) and an nn.Module
(returning the scalar loss, with `.metrics`), all on the logits-free core."""

from .chord import CHORDLoss, MuSchedule, chord_loss
from .cispo import CISPOLoss, cispo_loss
from .dft import DFTLoss, dft_loss
from .distill import DistillLoss, distill_loss
from .gmpo import GMPOLoss, gmpo_loss
from .ift import IFTLoss, ift_loss
from .kto import KTOLoss, kto_kl_estimate, kto_loss
from .minor_sft import MinorSFTLoss, minor_sft_loss
from .policy_gradient import GRPOLoss, grpo_loss
from .preference import CPOLoss, DPOLoss, ORPOLoss, cpo_loss, dpo_loss, orpo_loss, sequence_logps
from .registry import OBJECTIVES, Objective, register
from .sft import sft_loss
from .tokens import AGGREGATIONS, LossOutput, aggregate, objective_module

__all__ = [
    "AGGREGATIONS",
    "CHORDLoss",
    "CISPOLoss",
    "CPOLoss",
    "DFTLoss",
    "DPOLoss",
    "DistillLoss",
    "GMPOLoss",
    "GRPOLoss",
    "IFTLoss",
    "KTOLoss",
    "LossOutput",
    "MinorSFTLoss",
    "MuSchedule",
    "ORPOLoss",
    "aggregate",
    "chord_loss",
    "cispo_loss",
    "cpo_loss",
    "dft_loss",
    "distill_loss",
    "dpo_loss",
    "gmpo_loss",
    "grpo_loss",
    "ift_loss",
    "kto_kl_estimate",
    "kto_loss",
    "minor_sft_loss",
    "orpo_loss",
    "sequence_logps",
    "OBJECTIVES",
    "Objective",
    "register",
    "sft_loss",
    "objective_module",
]

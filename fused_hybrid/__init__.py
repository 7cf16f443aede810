"""fused-hybrid: logits-free fused LM-head losses for hybrid SFT + RL post-training."""

from .cross_entropy import FusedLinearCrossEntropyLoss, linear_cross_entropy
from .engine.backends import auto_backend, register_backend
from .engine.core import HeadStats
from .engine.entry import linear_head_loss, linear_head_stats
from .engine.head import HeadSpec, VocabParallel
from .hf import patch_model, unpatch_model
from .logprobs import linear_logprobs
from .objectives import (
    AGGREGATIONS,
    CHORDLoss,
    CISPOLoss,
    DFTLoss,
    DistillLoss,
    DPOLoss,
    GMPOLoss,
    GRPOLoss,
    IFTLoss,
    LossOutput,
    MinorSFTLoss,
    MuSchedule,
    chord_loss,
    cispo_loss,
    dft_loss,
    distill_loss,
    dpo_loss,
    gmpo_loss,
    grpo_loss,
    ift_loss,
    minor_sft_loss,
    sequence_logps,
)

__all__ = [
    "AGGREGATIONS",
    "CHORDLoss",
    "CISPOLoss",
    "DFTLoss",
    "DPOLoss",
    "DistillLoss",
    "FusedLinearCrossEntropyLoss",
    "GMPOLoss",
    "GRPOLoss",
    "HeadSpec",
    "HeadStats",
    "IFTLoss",
    "LossOutput",
    "MinorSFTLoss",
    "MuSchedule",
    "VocabParallel",
    "auto_backend",
    "chord_loss",
    "cispo_loss",
    "dft_loss",
    "distill_loss",
    "dpo_loss",
    "gmpo_loss",
    "grpo_loss",
    "ift_loss",
    "linear_cross_entropy",
    "linear_head_loss",
    "linear_head_stats",
    "linear_logprobs",
    "minor_sft_loss",
    "patch_model",
    "register_backend",
    "sequence_logps",
    "unpatch_model",
]
__version__ = "0.1.0"

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
    CPOLoss,
    DFTLoss,
    DistillLoss,
    DPOLoss,
    GMPOLoss,
    GRPOLoss,
    IFTLoss,
    KTOLoss,
    LossOutput,
    MinorSFTLoss,
    MuSchedule,
    ORPOLoss,
    chord_loss,
    cispo_loss,
    cpo_loss,
    dft_loss,
    distill_loss,
    dpo_loss,
    gmpo_loss,
    grpo_loss,
    ift_loss,
    kto_kl_estimate,
    kto_loss,
    minor_sft_loss,
    orpo_loss,
    sequence_logps,
)

__all__ = [
    "AGGREGATIONS",
    "CHORDLoss",
    "CISPOLoss",
    "CPOLoss",
    "DFTLoss",
    "DPOLoss",
    "DistillLoss",
    "FusedLinearCrossEntropyLoss",
    "GMPOLoss",
    "GRPOLoss",
    "HeadSpec",
    "HeadStats",
    "IFTLoss",
    "KTOLoss",
    "LossOutput",
    "MinorSFTLoss",
    "MuSchedule",
    "ORPOLoss",
    "VocabParallel",
    "auto_backend",
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
    "linear_cross_entropy",
    "linear_head_loss",
    "linear_head_stats",
    "linear_logprobs",
    "minor_sft_loss",
    "orpo_loss",
    "patch_model",
    "register_backend",
    "sequence_logps",
    "unpatch_model",
]


def _installed_version() -> str:
    """The version of the installed distribution (pyproject.toml's, the one source of it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fused-hybrid")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


__version__ = _installed_version()

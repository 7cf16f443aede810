"""fused-hybrid: logits-free fused LM-head losses for hybrid SFT + RL post-training."""

from .cross_entropy import FusedLinearCrossEntropyLoss, linear_cross_entropy
from .head_stats import HeadStats, linear_head_stats
from .logprobs import linear_logprobs

__all__ = [
    "FusedLinearCrossEntropyLoss",
    "HeadStats",
    "linear_cross_entropy",
    "linear_head_stats",
    "linear_logprobs",
]
__version__ = "0.1.0"

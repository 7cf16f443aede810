"""The thin hybrid trainer (SFT, DFT, CHORD, GRPO, DPO, MinorSFT, IFT) and its configuration."""

from .config import MODES, ConfigError, TrainConfig, load_config
from .loop import HybridTrainer

__all__ = ["MODES", "ConfigError", "HybridTrainer", "TrainConfig", "load_config"]

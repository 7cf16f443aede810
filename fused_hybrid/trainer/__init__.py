"""The thin hybrid trainer (SFT, DFT, CHORD, GRPO, DPO, MinorSFT, IFT) and its configuration."""

from .config import ConfigError, TrainConfig, UserError, load_config, registered_modes
from .loop import HybridTrainer

__all__ = ["ConfigError", "HybridTrainer", "TrainConfig", "UserError", "load_config", "registered_modes"]

"""The thin hybrid trainer (SFT, DFT, CHORD, GRPO, DPO, MinorSFT, IFT) and its configuration."""

from .config import ConfigError, TrainConfig, UserError, registered_modes
from .config_reading import load_config
from .loop import HybridTrainer

__all__ = ["ConfigError", "HybridTrainer", "TrainConfig", "UserError", "load_config", "registered_modes"]

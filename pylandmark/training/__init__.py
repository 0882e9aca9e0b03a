"""Fine-tuning on SfM-120k: config and presets, the loop, tuple mining, validation, run log,
checkpoints, export (imports torch)."""
from .config import TRAIN_PRESETS, TrainConfig
from .loop import train

__all__ = ["TrainConfig", "TRAIN_PRESETS", "train"]

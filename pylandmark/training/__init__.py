"""Fine-tuning on SfM-120k: config and presets, the loop, tuple mining, validation, checkpoints."""
from .loop import TRAIN_PRESETS, TrainConfig, train

__all__ = ["TrainConfig", "TRAIN_PRESETS", "train"]

"""Fine-tuning on SfM-120k: config and presets, the loop, tuple mining, validation, checkpoints."""
from .loop import TrainConfig, train

__all__ = ["TrainConfig", "train"]

"""Fine-tuning: config, loss, jitted sharded step, orbax checkpoints, evaluation, the loop."""

from research.training.config import ConfigError, TrainConfig
from research.training.trainer import TrainingDiverged, TrainResult, train

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "TrainingDiverged", "train"]

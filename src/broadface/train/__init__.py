"""Training: typed configs, the trainer loop, checkpoints, optimisers, schedules and logs."""
from broadface.train.config import Config, apply_overrides, load_config
from broadface.train.trainer import Trainer, TrainingDiverged, TrainResult, train

__all__ = ["Config", "TrainResult", "Trainer", "TrainingDiverged", "apply_overrides", "load_config", "train"]

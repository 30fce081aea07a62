"""Training: typed configs, build / step / checkpoint, the loop, optimisers, schedules and logs."""
from broadface.train.config import Config, apply_overrides, load_config
from broadface.train.step import StepStats
from broadface.train.trainer import Trainer, TrainingDiverged, TrainResult, train

__all__ = ["Config", "StepStats", "TrainResult", "Trainer", "TrainingDiverged", "apply_overrides", "load_config",
           "train"]

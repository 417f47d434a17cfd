"""Training: configs, optimizer, loss, the jitted step, checkpoints, logging and the loop."""

from attnlab.train.config import OptimizerConfig, TrainConfig
from attnlab.train.experiment import ExperimentConfig
from attnlab.train.loop import NonFiniteLossError, TrainResult, build_state, train

__all__ = ["ExperimentConfig", "NonFiniteLossError", "OptimizerConfig", "TrainConfig", "TrainResult",
           "build_state", "train"]

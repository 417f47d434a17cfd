"""Training: the run's configs, the jitted step, logging and the loop (``attnlab.train.train``). The train state
it steps (model, optimizer, checkpoints) is :mod:`attnlab.state`."""

from attnlab.state.optimizer import OptimizerConfig
from attnlab.train.config import TrainConfig
from attnlab.train.experiment import ExperimentConfig
from attnlab.train.loop import (NonFiniteLossError, RunMismatchError, TrainResult, check_workdir,
                                train)

__all__ = ["ExperimentConfig", "NonFiniteLossError", "OptimizerConfig", "RunMismatchError", "TrainConfig",
           "TrainResult", "check_workdir", "train"]

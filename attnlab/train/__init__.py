"""Training: configs, optimizer, loss, the jitted step, checkpoints, logging and the loop
(``attnlab.train.loop.train``; also reachable as ``attnlab.train.train``)."""

from attnlab.train.config import OptimizerConfig, TrainConfig
from attnlab.train.experiment import ExperimentConfig

_LOOP = ("NonFiniteLossError", "TrainResult", "build_state", "train")
__all__ = ["ExperimentConfig", "OptimizerConfig", "TrainConfig", *_LOOP]


def __getattr__(name):  # the loop imports attnlab.eval, which imports this package: load it lazily
  if name in _LOOP:
    from attnlab.train import loop
    return getattr(loop, name)
  raise AttributeError(name)

"""The whole run's configuration: model, data, optimizer, training, evaluation and sink analysis."""

from __future__ import annotations

import dataclasses

from attnlab.analysis.config import AnalysisConfig
from attnlab.data.pipeline import DataConfig
from attnlab.eval.config import EvalConfig
from attnlab.model.config import ModelConfig
from attnlab.parallel.mesh import MeshConfig
from attnlab.train.config import OptimizerConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything a run needs; the workdir stores it and refuses to resume under a different one."""

  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  train: TrainConfig = TrainConfig()
  eval: EvalConfig = EvalConfig()
  analysis: AnalysisConfig = AnalysisConfig()
  # How the run is laid out on devices, not what it computes: left out of the run record (repr) and equality,
  # so a run may resume on another mesh.
  mesh: MeshConfig = dataclasses.field(default=MeshConfig(), repr=False, compare=False)

  def __post_init__(self):
    if self.data.seq_len > self.model.max_seq_len:
      raise ValueError(f"DataConfig.seq_len ({self.data.seq_len}) exceeds ModelConfig.max_seq_len "
                       f"({self.model.max_seq_len})")
    if self.data.batch_size % self.train.grad_accum:
      raise ValueError(f"DataConfig.batch_size ({self.data.batch_size}) is not divisible by TrainConfig.grad_accum "
                       f"({self.train.grad_accum})")

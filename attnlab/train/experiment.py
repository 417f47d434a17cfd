"""The whole run's configuration: model, data, optimizer, training, evaluation and sink analysis."""

from __future__ import annotations

import dataclasses

from attnlab.analysis.config import AnalysisConfig
from attnlab.data.pipeline import DataConfig
from attnlab.eval.config import EvalConfig
from attnlab.model.config import ModelConfig
from attnlab.parallel.mesh import MeshConfig
from attnlab.state.optimizer import OptimizerConfig
from attnlab.train.config import TrainConfig


def required_special_tokens(model: ModelConfig):
  """The special tokens the model's attention layers need in their input (``special_tokens()`` of their configs:
  landmark, meta tokens), or None. Layers needing different ones cannot share a batch: ValueError."""
  found = {a.special_tokens() for a in model.attention_pattern if hasattr(a, "special_tokens")}
  if len(found) > 1:
    raise ValueError(f"the model's attention layers need different special tokens in their input: "
                     f"{sorted(map(repr, found))}")
  return found.pop() if found else None


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
    special = required_special_tokens(self.model)
    if special is not None:
      if self.data.special_tokens is None:
        object.__setattr__(self, "data", dataclasses.replace(self.data, special_tokens=special))
      elif self.data.special_tokens != special:
        raise ValueError(f"DataConfig.special_tokens ({self.data.special_tokens}) disagrees with the model's "
                         f"attention, which needs {special}; leave it unbound to derive it from the model")
    if self.data.special_tokens is not None and max(self.data.special_tokens.ids) >= self.model.vocab_size:
      raise ValueError(f"special token ids {self.data.special_tokens.ids} must be < ModelConfig.vocab_size "
                       f"({self.model.vocab_size})")
    if self.data.batch_size % self.train.grad_accum:
      raise ValueError(f"DataConfig.batch_size ({self.data.batch_size}) is not divisible by TrainConfig.grad_accum "
                       f"({self.train.grad_accum})")

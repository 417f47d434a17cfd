"""Typed, frozen configuration of the sink analysis of a run (bound by gin as ``AnalysisConfig``)."""

from __future__ import annotations

import dataclasses

from attnlab import fields


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
  """The probe batch and the sink metrics (Gu et al. 2025: ``Sink_k^eps`` on ``num_sequences`` held-out sequences
  of ``seq_len`` tokens; defaults 128 x 64, k = 1, eps = 0.3).

  ``every``: log the model-level sink metrics (``sinks/*``) to metrics.jsonl and TensorBoard every that many
  training steps, on the same fixed probe batch (0 = off; each costs one forward pass over the probe batch).
  """

  every: int = 0
  num_sequences: int = 128
  seq_len: int = 64  # capped at DataConfig.seq_len
  k: int = 1
  eps: float = 0.3

  def __post_init__(self):
    fields.integer("AnalysisConfig", "every", self.every, minimum=0)
    fields.integer("AnalysisConfig", "seq_len", self.seq_len, minimum=2)
    for name in ("num_sequences", "k"):
      fields.integer("AnalysisConfig", name, getattr(self, name))
    fields.number("AnalysisConfig", "eps", self.eps)
    if self.every < 0 or self.num_sequences < 1 or self.seq_len < 2 or self.k < 1:
      raise ValueError(f"AnalysisConfig needs every >= 0, num_sequences >= 1, seq_len >= 2 and k >= 1; got {self}")
    if not 0.0 < self.eps < 1.0:
      raise ValueError(f"AnalysisConfig.eps must be in (0, 1); got {self.eps}")

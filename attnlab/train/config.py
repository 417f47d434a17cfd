"""Typed, frozen configuration of the training run (bound by gin in ``attnlab.configs``)."""

from __future__ import annotations

import dataclasses

from attnlab import fields


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training run: length, loss options, logging and checkpointing cadence."""

  steps: int = 1000
  seed: int = 0  # model initialisation (the data seed is DataConfig.seed)
  grad_accum: int = 1  # micro-batches per step; DataConfig.batch_size must be divisible by it
  z_loss: float = 0.0  # weight of log(Z)^2 (PaLM, Chowdhery et al. 2022)
  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  eval_every: int = 0  # 0 -> no in-training evaluation
  eval_at_end: bool = True  # attnlab train / sweep run the full evaluation (eval.json) when training finishes
  peak_flops: float = 0.0  # FLOP/s for the MFU estimate; 0 -> measured at start with a 1024² f32 matmul
  progress: bool = True  # tqdm progress bar

  def __post_init__(self):
    o = "TrainConfig"
    for name in ("steps", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints"):
      fields.integer(o, name, getattr(self, name))
    fields.integer(o, "seed", self.seed, minimum=0)
    fields.integer(o, "eval_every", self.eval_every, minimum=0)
    fields.number(o, "z_loss", self.z_loss, low=0.0)
    fields.number(o, "peak_flops", self.peak_flops, low=0.0)
    for name in ("async_checkpoint", "eval_at_end", "progress"):
      fields.boolean(o, name, getattr(self, name))

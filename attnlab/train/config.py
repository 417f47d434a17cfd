"""Typed, frozen configuration of optimisation and the training run (bound by gin in ``attnlab.configs``)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW (Loshchilov & Hutter 2019) with linear warmup to ``learning_rate`` then cosine or linear decay to
  ``learning_rate · final_lr_fraction`` at ``decay_steps`` (None -> the run's ``steps``), and global-norm
  gradient clipping. Weight decay applies to matrices only, not to norms, biases or embeddings unless asked."""

  learning_rate: float = 3e-3
  warmup_steps: int = 100
  decay: str = "cosine"  # "cosine" | "linear" | "constant"
  decay_steps: int | None = None
  final_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  decay_embeddings: bool = False
  decay_norms_and_biases: bool = False
  grad_clip: float | None = 1.0

  def __post_init__(self):
    if self.decay not in ("cosine", "linear", "constant"):
      raise ValueError(f"decay must be 'cosine', 'linear' or 'constant'; got {self.decay!r}")
    if self.learning_rate <= 0 or self.warmup_steps < 0:
      raise ValueError("learning_rate must be positive and warmup_steps non-negative")


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
  eval_at_end: bool = True  # run the full evaluation (eval.json) when training finishes
  peak_flops: float = 0.0  # FLOP/s for the MFU estimate; 0 -> measured at start with a 1024² f32 matmul
  progress: bool = True  # tqdm progress bar

  def __post_init__(self):
    if self.steps < 1 or self.grad_accum < 1 or self.log_every < 1 or self.checkpoint_every < 1:
      raise ValueError("steps, grad_accum, log_every and checkpoint_every must be positive")

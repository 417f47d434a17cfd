"""The optimizer of the train state: optax AdamW with warmup + decay, gradient clipping and a weight-decay mask
(its typed config :class:`OptimizerConfig` is bound by gin in ``attnlab.configs``)."""

from __future__ import annotations

import dataclasses

import jax
import optax


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


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup 0 -> lr over ``warmup_steps``, then cosine/linear decay to ``lr · final_lr_fraction``."""
  peak, end = cfg.learning_rate, cfg.learning_rate * cfg.final_lr_fraction
  decay_steps = max((cfg.decay_steps or total_steps) - cfg.warmup_steps, 1)
  warmup = optax.linear_schedule(0.0, peak, max(cfg.warmup_steps, 1))
  if cfg.decay == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.final_lr_fraction)
  elif cfg.decay == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  else:
    after = optax.constant_schedule(peak)
  return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def weight_decay_mask(params, cfg: OptimizerConfig):
  """True for the leaves that get weight decay: matrices (ndim >= 2), except embedding tables unless
  ``decay_embeddings``; vectors (norm scales, biases, sink logits) only with ``decay_norms_and_biases``."""

  def decays(path, x) -> bool:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if "embed" in names:
      return cfg.decay_embeddings
    return x.ndim >= 2 or cfg.decay_norms_and_biases

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(cfg, total_steps)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mask=lambda p: weight_decay_mask(p, cfg))
  tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip else adamw
  return tx, schedule

"""The optimizer of the train state: optax AdamW with warmup + decay, gradient clipping and a weight-decay mask
(its typed config :class:`OptimizerConfig` is bound by gin in ``attnlab.configs``)."""

from __future__ import annotations

import dataclasses

import jax
import optax

from attnlab import fields


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
    o = "OptimizerConfig"
    fields.choice(o, "decay", self.decay, ("cosine", "linear", "constant"))
    fields.number(o, "learning_rate", self.learning_rate, low=0.0, low_open=True)
    fields.integer(o, "warmup_steps", self.warmup_steps, minimum=0)
    fields.integer(o, "decay_steps", self.decay_steps, allow_none=True)
    fields.number(o, "final_lr_fraction", self.final_lr_fraction, low=0.0, high=1.0)
    fields.number(o, "b1", self.b1, low=0.0, high=1.0, high_open=True)
    fields.number(o, "b2", self.b2, low=0.0, high=1.0, high_open=True)
    fields.number(o, "eps", self.eps, low=0.0, low_open=True)
    fields.number(o, "weight_decay", self.weight_decay, low=0.0)
    fields.boolean(o, "decay_embeddings", self.decay_embeddings)
    fields.boolean(o, "decay_norms_and_biases", self.decay_norms_and_biases)
    fields.number(o, "grad_clip", self.grad_clip, low=0.0, low_open=True, allow_none=True)


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

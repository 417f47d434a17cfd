"""optax AdamW with warmup + decay, gradient clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax

from attnlab.train.config import OptimizerConfig


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

"""Masked next-token cross-entropy with optional z-loss, computed in float32 from one log-sum-exp.

    ce_t = logZ_t − logit_t[y_t],  logZ_t = logsumexp_v logit_t[v];   z-loss_t = α · logZ_t²   (PaLM)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_losses(logits: jax.Array, targets: jax.Array, z_loss: float = 0.0):
  """Per-token (cross-entropy, z-loss), each (batch, seq) float32."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return log_z - target_logit, z_loss * jnp.square(log_z)

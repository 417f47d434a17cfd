"""The model on a batch, shared by training and evaluation: the model inputs of a batch, the forward pass on a split
(graphdef, params, rest) model, and the per-token losses.

Masked next-token cross-entropy with optional z-loss, computed in float32 from one log-sum-exp:

    ce_t = logZ_t − logit_t[y_t],  logZ_t = logsumexp_v logit_t[v];   z-loss_t = α · logZ_t²   (PaLM)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

MODEL_INPUTS = ("inputs", "positions", "segment_ids")


def split_model(model: nnx.Module):
  """(graphdef, params, rest) of a model in its current (train/eval) mode."""
  return nnx.split(model, nnx.Param, ...)


def forward(graphdef, params, rest, batch, *, return_aux=True):
  """Runs the model on a batch; returns (logits, aux, rest after the forward)."""
  # copy=True: fresh Variables owned by this trace, so the forward may update non-Param state (e.g. routing's
  # k-means EMA) inside jax.value_and_grad.
  model = nnx.merge(graphdef, params, rest, copy=True)
  logits, aux = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                      return_aux=return_aux)
  _, _, new_rest = split_model(model)
  return logits, aux, new_rest


def token_losses(logits: jax.Array, targets: jax.Array, z_loss: float = 0.0):
  """Per-token (cross-entropy, z-loss), each (batch, seq) float32."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return log_z - target_logit, z_loss * jnp.square(log_z)

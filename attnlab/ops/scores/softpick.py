"""Softpick (Zuhri et al. 2025, "Softpick: No Attention Sink, No Massive Activations with Rectified Softmax",
arXiv 2504.20966).

    p_ij = relu(exp(s_ij) - 1) / (sum_{j visible} |exp(s_ij) - 1| + eps)

Computed without overflow by factoring out ``exp(m)``, ``m = max(0, max_j s_ij)``:
    p_ij = relu(exp(s_ij - m) - exp(-m)) / (sum_j |exp(s_ij - m) - exp(-m)| + eps * exp(-m)).
Masked keys contribute nothing to the denominator (a masked key is not a key with exp(s) - 1 = -1).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attnlab.ops.scores.registry import Blockwise, register_score


@dataclasses.dataclass(frozen=True)
class SoftpickBlockwise(Blockwise):
  """Online softpick: running shift m = max(0, max_j s_ij), u = relu(e^(s-m) - e^-m), d = |e^(s-m) - e^-m|,
  D = l + eps e^-m, r = log(sum_j |e^s_ij - 1| + eps). dL/ds = e^(s - r) (dp [s > 0] - delta sign(s))."""

  eps: float
  online = True
  init_shift = 0.0

  def block(self, s, m, n):
    e = jnp.exp(s - m) - jnp.exp(-m)
    return jax.nn.relu(e), jnp.abs(e)

  def denominator(self, l, m, n):
    return l + self.eps * jnp.exp(-m)

  def probs(self, s, r, n):
    return jax.nn.relu(jnp.exp(s - r) - jnp.exp(-r))

  def dlogits(self, s, r, dp, delta, n):
    g = jnp.where(s > 0, dp - delta, jnp.where(s < 0, delta, 0.0))  # dp [s > 0] - delta sign(s), sign-free (TPU)
    return jnp.exp(s - r) * g


def softpick_blockwise(ctx, eps=1e-6):
  del ctx
  return SoftpickBlockwise(eps=float(eps))


@register_score("softpick", params=("eps",), blockwise=softpick_blockwise)
def softpick_weights(s, mask, *, sink_logits=None, ctx=None, eps=1e-6):
  """p_ij = relu(e^s_ij - 1) / (sum_j |e^s_ij - 1| + eps), overflow-free."""
  del sink_logits, ctx
  s = jnp.where(mask, s, 0.0)
  m = jax.lax.stop_gradient(jnp.maximum(jnp.max(s, axis=-1, keepdims=True), 0.0))
  shifted = jnp.where(mask, jnp.exp(s - m) - jnp.exp(-m), 0.0)
  denom = jnp.sum(jnp.abs(shifted), axis=-1, keepdims=True) + eps * jnp.exp(-m)
  return jax.nn.relu(shifted) / denom

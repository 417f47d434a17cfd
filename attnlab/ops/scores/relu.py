"""ReLU attention, normalised by the number of visible keys.

    p_ij = relu(s_ij) / N_i,   N_i = |{j : j visible to i}|   (= i, 1-based, for causal self-attention)

This is the sink-free "ReLU/n" attention of Guo et al. 2024, "Active-Dormant Attention Heads: Mechanistically
Demystifying Extreme-Token Phenomena in LLMs", arXiv 2410.13835 (their
``relu(s)/i``). There is no row-sum normalisation: rows need not sum to 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attnlab.ops.scores.registry import Blockwise, register_score, visible_count


@dataclasses.dataclass(frozen=True)
class ReluBlockwise(Blockwise):
  """u = relu(s), no row sum, D = max(n_i, 1). dL/ds = dp [s > 0] / D."""

  uses_sum = False
  needs_count = True

  def block(self, s, m, n):
    u = jax.nn.relu(s)
    return u, u

  def denominator(self, l, m, n):
    return jnp.broadcast_to(jnp.maximum(n, 1.0), l.shape)

  def probs(self, s, r, n):
    return jax.nn.relu(s) * jnp.exp(-r)

  def dlogits(self, s, r, dp, delta, n):
    return jnp.where(s > 0, dp, 0.0) * jnp.exp(-r)


def relu_blockwise(ctx):
  del ctx
  return ReluBlockwise()


@register_score("relu", blockwise=relu_blockwise)
def relu_weights(s, mask, *, sink_logits=None, ctx=None):
  """p_ij = relu(s_ij) / N_i over visible keys (N_i = visible-key count of row i)."""
  del sink_logits, ctx
  n = visible_count(mask)
  return jnp.where(mask, jax.nn.relu(jnp.where(mask, s, 0.0)), 0.0) / jnp.maximum(n, 1.0)

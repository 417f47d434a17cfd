"""ReLU attention, normalised by the number of visible keys.

    p_ij = relu(s_ij) / N_i,   N_i = |{j : j visible to i}|   (= i, 1-based, for causal self-attention)

This is the sink-free "ReLU/n" attention of Guo et al. 2024, "Active-Dormant Attention Heads" (their
``relu(s)/i``). There is no row-sum normalisation: rows need not sum to 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.attention.scores.registry import register_score, visible_count


@register_score("relu")
def relu_weights(s, mask, *, sink_logits=None, ctx=None):
  """p_ij = relu(s_ij) / N_i over visible keys (N_i = visible-key count of row i)."""
  del sink_logits, ctx
  n = visible_count(mask)
  return jnp.where(mask, jax.nn.relu(jnp.where(mask, s, 0.0)), 0.0) / jnp.maximum(n, 1.0)

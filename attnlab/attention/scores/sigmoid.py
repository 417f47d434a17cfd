"""Sigmoid attention.

    p_ij = sigma(s_ij + b)                         (normalize=False; Ramapuram et al. 2024, arXiv 2409.04431)
    p_ij = sigma(s_ij + b) / sum_j sigma(s_ij + b)  (normalize=True; Gu et al. 2025's normalised-sigmoid row)

``b`` defaults to ``-log(kv_len)`` (Apple's recommended ``b = -log n``, which makes each weight ~1/n at
initialisation); ``b=0.0`` is Gu et al.'s "sigmoid w/o normalisation". Masked entries are zeroed after the
nonlinearity (equivalently, a -inf logit before it), never by adding a large negative after it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnlab.attention.scores.registry import register_score, safe_row_normalize


def default_sigmoid_bias(kv_len: int) -> float:
  return -math.log(max(kv_len, 1))


@register_score("sigmoid", params=("b", "normalize"))
def sigmoid_weights(s, mask, *, sink_logits=None, ctx, b=None, normalize=False):
  """p_ij = sigma(s_ij + b) (optionally row-normalised); b defaults to -log(kv_len)."""
  del sink_logits
  if b is None:
    b = default_sigmoid_bias(ctx.kv_len)
  w = jnp.where(mask, jax.nn.sigmoid(jnp.where(mask, s, 0.0) + b), 0.0)
  return safe_row_normalize(w) if normalize else w

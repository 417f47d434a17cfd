"""Sigmoid attention.

    p_ij = sigma(s_ij + b)                         (normalize=False; Ramapuram et al. 2024, arXiv 2409.04431)
    p_ij = sigma(s_ij + b) / sum_j sigma(s_ij + b)  (normalize=True; Gu et al. 2025's normalised-sigmoid row)

``b`` defaults to ``-log(kv_len)`` (Apple's recommended ``b = -log n``, which makes each weight ~1/n at
initialisation); ``b=0.0`` is Gu et al.'s "sigmoid w/o normalisation". Masked entries are zeroed after the
nonlinearity (equivalently, a -inf logit before it), never by adding a large negative after it.

Papers: Ramapuram et al., "Theory, Analysis, and Best Practices for Sigmoid Self-Attention" (arXiv 2409.04431);
Gu et al., "When Attention Sink Emerges in Language Models: An Empirical View" (arXiv 2410.10781).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from attnlab.ops.scores.registry import Blockwise, register_score, safe_row_normalize


def default_sigmoid_bias(kv_len: int) -> float:
  return -math.log(max(kv_len, 1))


@dataclasses.dataclass(frozen=True)
class SigmoidBlockwise(Blockwise):
  """FlashSigmoid: u = sigma(s + b) needs no running statistics. normalize=True carries the l1 row sum
  (u = d, D = l); otherwise D = 1 and l is not carried. dL/ds = (dp - [normalize] delta) p (1 - sigma)."""

  b: float
  normalize: bool

  @property
  def uses_sum(self):
    return self.normalize

  def block(self, s, m, n):
    u = jax.nn.sigmoid(s + self.b)
    return u, u

  def denominator(self, l, m, n):
    return l if self.normalize else jnp.ones_like(l)

  def probs(self, s, r, n):
    return jax.nn.sigmoid(s + self.b) * jnp.exp(-r)

  def dlogits(self, s, r, dp, delta, n):
    sig = jax.nn.sigmoid(s + self.b)
    g = dp - delta if self.normalize else dp
    return g * sig * jnp.exp(-r) * (1.0 - sig)


def sigmoid_blockwise(ctx, b=None, normalize=False):
  return SigmoidBlockwise(b=float(default_sigmoid_bias(ctx.kv_len) if b is None else b), normalize=bool(normalize))


@register_score("sigmoid", params=("b", "normalize"), blockwise=sigmoid_blockwise)
def sigmoid_weights(s, mask, *, sink_logits=None, ctx, b=None, normalize=False):
  """p_ij = sigma(s_ij + b) (optionally row-normalised); b defaults to -log(kv_len)."""
  del sink_logits
  if b is None:
    b = default_sigmoid_bias(ctx.kv_len)
  w = jnp.where(mask, jax.nn.sigmoid(jnp.where(mask, s, 0.0) + b), 0.0)
  return safe_row_normalize(w) if normalize else w

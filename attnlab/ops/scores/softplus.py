"""Softplus attention with optional re-weighting (LSSA / LSSAR; Gao & Spratling 2025, "Softplus Attention with
Re-weighting Boosts Length Extrapolation in Large Language Models", arXiv 2501.13428).

    q_i <- q_i / ||q_i||,  k_j <- k_j / ||k_j||
    S_ij = log(N_i) * (scale * q_i.k_j + bias_ij),   scale defaults to log(d)     (so S = log d log N_i q.k)
    A_ij = softplus(S_ij) * M_ij,  A_i <- A_i / (||A_i||_1 + eps)                                    (LSSA)
    re-weighting (reweight_power = p):  A_ij <- relu(A_ij * N_i - O_i)^p,  A_i <- A_i / (||A_i||_1 + eps) (LSSAR)

``N_i`` is the number of keys visible to query i (``i``, 1-based, in causal self-attention) and ``O_i = 0`` for
rows with ``N_i <= 3``, else 1. The paper recommends p = 15 (p = 3 at 1K context). The formulas follow the paper's
equations; the official code could not be checked, so treat details as a reconstruction.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from attnlab.ops.scores.registry import Blockwise, register_score, safe_row_normalize, visible_count

_L2_EPS = 1e-6


def _l2_normalize(x):
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + _L2_EPS)).astype(x.dtype)


def softplus_prepare(q, k, scale, ctx, **params):
  del params
  return _l2_normalize(q), _l2_normalize(k), (math.log(ctx.head_dim) if scale is None else scale)


@dataclasses.dataclass(frozen=True)
class SoftplusBlockwise(Blockwise):
  """LSSA one block at a time: c_i = log max(n_i, 1), u = d = softplus(c_i s), D = l + eps.
  dL/ds = (dp - delta) c_i sigma(c_i s) / D. (q, k are l2-normalised by ``prepare`` before the kernel.)"""

  eps: float
  needs_count = True

  def block(self, s, m, n):
    u = jax.nn.softplus(jnp.log(jnp.maximum(n, 1.0)) * s)
    return u, u

  def denominator(self, l, m, n):
    return l + self.eps

  def probs(self, s, r, n):
    return jax.nn.softplus(jnp.log(jnp.maximum(n, 1.0)) * s) * jnp.exp(-r)

  def dlogits(self, s, r, dp, delta, n):
    c = jnp.log(jnp.maximum(n, 1.0))
    return (dp - delta) * c * jax.nn.sigmoid(c * s) * jnp.exp(-r)


def softplus_blockwise(ctx, reweight_power=None, eps=1e-8):
  del ctx
  if reweight_power is not None:
    raise ValueError("softplus re-weighting (LSSAR, reweight_power) needs a second pass over the keys with the "
                     "first pass's row sums; the flash kernel supports LSSA only (reweight_power=None). "
                     "Use impl='xla' for LSSAR.")
  return SoftplusBlockwise(eps=float(eps))


@register_score("softplus", params=("reweight_power", "eps"), prepare=softplus_prepare,
                blockwise=softplus_blockwise)
def softplus_weights(s, mask, *, sink_logits=None, ctx=None, reweight_power=None, eps=1e-8):
  """A = l1norm(softplus(log N_i * s) * M); optional re-weighting relu(A N_i - O_i)^p, l1norm again."""
  del sink_logits, ctx
  n = visible_count(mask)
  a = jnp.where(mask, jax.nn.softplus(jnp.log(jnp.maximum(n, 1.0)) * jnp.where(mask, s, 0.0)), 0.0)
  a = safe_row_normalize(a, eps)
  if reweight_power is not None:
    offset = jnp.where(n <= 3, 0.0, 1.0)
    a = jnp.where(mask, jax.nn.relu(a * n - offset) ** reweight_power, 0.0)
    a = safe_row_normalize(a, eps)
  return a

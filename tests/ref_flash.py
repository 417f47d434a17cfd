"""Naive float64 reference for the flash kernels: dense masks, each score function written out directly.

Returns (o, r) with r the kernels' row residual: log-sum-exp (sink included) for softmax, log of the row
denominator for the normalised scores (softpick: log(sum|e^s - 1| + eps); l1 scores: log(row sum (+ eps))),
log(max(n, 1)) for relu/n and 0 for unnormalised sigmoid. Call inside ``jax.enable_x64(True)``.
"""

import math

import jax
import jax.numpy as jnp


def naive_flash(q, k, v, *, segment_ids=None, sink_logits=None, score="softmax", causal=True, scale=None,
                window=None, **params):
  f64 = jnp.float64
  q, k, v = (x.astype(f64) for x in (q, k, v))
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  k = jnp.repeat(k, heads // k.shape[2], axis=2)
  v = jnp.repeat(v, heads // v.shape[2], axis=2)
  if score == "softplus":
    q = q / jnp.sqrt(jnp.sum(q * q, -1, keepdims=True) + 1e-6)
    k = k / jnp.sqrt(jnp.sum(k * k, -1, keepdims=True) + 1e-6)
    scale = math.log(head_dim) if scale is None else scale
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale

  i = jnp.arange(q_len)[:, None] + (kv_len - q_len)
  j = jnp.arange(kv_len)[None, :]
  mask = jnp.ones((batch, 1, q_len, kv_len), bool)
  if causal:
    mask = mask & (j <= i)
  if window is not None:  # sliding window: p - W < j <= p
    mask = mask & (j <= i) & (j > i - window)
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  n = jnp.sum(mask, -1, keepdims=True).astype(f64)
  s0 = jnp.where(mask, s, 0.0)

  if score == "softmax":
    logits = jnp.where(mask, s, -jnp.inf)
    if sink_logits is not None:
      sink = jnp.broadcast_to(sink_logits.astype(f64)[None, :, None, None], s.shape[:3] + (1,))
      logits = jnp.concatenate([logits, sink], -1)
    r = jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s0 - r), 0.0)
  elif score == "sigmoid":
    b = params.get("b", -math.log(kv_len))
    u = jnp.where(mask, 1.0 / (1.0 + jnp.exp(-(s0 + b))), 0.0)
    if params.get("normalize", False):
      total = jnp.sum(u, -1, keepdims=True)
      p, r = u / total, jnp.log(total)
    else:
      p, r = u, jnp.zeros_like(n)
  elif score == "softpick":
    a = jnp.where(mask, jnp.exp(s0) - 1.0, 0.0)
    denom = jnp.sum(jnp.abs(a), -1, keepdims=True) + params.get("eps", 1e-6)
    p, r = jnp.maximum(a, 0.0) / denom, jnp.log(denom)
  elif score == "relu":
    denom = jnp.maximum(n, 1.0)
    p, r = jnp.where(mask, jnp.maximum(s0, 0.0), 0.0) / denom, jnp.log(denom)
  elif score == "softplus":
    u = jnp.where(mask, jnp.logaddexp(0.0, jnp.log(jnp.maximum(n, 1.0)) * s0), 0.0)
    denom = jnp.sum(u, -1, keepdims=True) + params.get("eps", 1e-8)
    p, r = u / denom, jnp.log(denom)
  else:
    raise ValueError(score)
  o = jnp.einsum("bhqk,bkhd->bqhd", p, v)
  return o, jnp.broadcast_to(r, s.shape[:3] + (1,))[..., 0]

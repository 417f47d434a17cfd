"""Naive float64 references for every score function of ``attnlab.attend``.

Deliberately simple and independent of the library: dense (batch, heads, q, k) arrays, masks built by explicit
loops, kv heads repeated for GQA, each score function written straight from its equation. Call inside
``jax.enable_x64(True)`` so that everything is float64 (it is differentiable with jax.grad).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def dense_mask(batch, heads, q_len, kv_len, *, causal, segment_ids=None, mask=None, window=None) -> np.ndarray:
  """(batch, heads, q_len, kv_len) boolean; query i sits at absolute position p = i + kv_len - q_len and, with a
  sliding window W, sees only keys p - W < j <= p."""
  out = np.zeros((batch, heads, q_len, kv_len), bool)
  for b in range(batch):
    for h in range(heads):
      for i in range(q_len):
        for j in range(kv_len):
          p = i + kv_len - q_len
          ok = (j <= p) if causal else True
          if window is not None:
            ok = ok and p - window < j <= p
          if segment_ids is not None:
            ok = ok and segment_ids[0][b, i] == segment_ids[1][b, j]
          if mask is not None:
            ok = ok and bool(np.broadcast_to(mask, (batch, heads, q_len, kv_len))[b, h, i, j])
          out[b, h, i, j] = ok
  return out


def reference_attend(q, k, v, *, score="softmax", causal=True, scale=None, bias=None, segment_ids=None, mask=None,
                     sink_logits=None, window=None, **params):
  """Dense float64 attention: returns (batch, q_len, heads, head_dim)."""
  q, k, v = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
  batch, q_len, heads, d = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  k = jnp.repeat(k, heads // kv_heads, axis=2)  # query head h reads kv head h // group
  v = jnp.repeat(v, heads // kv_heads, axis=2)
  if score == "softplus":  # LSSA: l2-normalised q, k; scale log d
    q = q / jnp.sqrt(jnp.sum(q * q, -1, keepdims=True) + 1e-6)
    k = k / jnp.sqrt(jnp.sum(k * k, -1, keepdims=True) + 1e-6)
    scale = math.log(d) if scale is None else scale
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if bias is not None:
    s = s + jnp.asarray(bias, jnp.float64)
  m = jnp.asarray(dense_mask(batch, heads, q_len, kv_len, causal=causal, segment_ids=segment_ids, mask=mask,
                            window=window))
  n = m.sum(-1, keepdims=True).astype(jnp.float64)  # visible keys per row

  if score == "softmax":
    e = jnp.where(m, jnp.exp(jnp.where(m, s, 0.0)), 0.0)
    denom = e.sum(-1, keepdims=True)
    if sink_logits is not None:
      denom = denom + jnp.exp(jnp.asarray(sink_logits, jnp.float64))[None, :, None, None]
    p = e / jnp.where(denom == 0, 1.0, denom)
  elif score == "sigmoid":
    b = params.get("b")
    b = -math.log(kv_len) if b is None else b
    p = jnp.where(m, 1.0 / (1.0 + jnp.exp(-(jnp.where(m, s, 0.0) + b))), 0.0)
    if params.get("normalize", False):
      row = p.sum(-1, keepdims=True)
      p = p / jnp.where(row == 0, 1.0, row)
  elif score == "relu":
    p = jnp.where(m, jnp.maximum(s, 0.0), 0.0) / jnp.maximum(n, 1.0)
  elif score == "softpick":
    eps = params.get("eps", 1e-6)
    x = jnp.where(m, jnp.exp(jnp.where(m, s, 0.0)) - 1.0, 0.0)
    p = jnp.maximum(x, 0.0) / (jnp.abs(x).sum(-1, keepdims=True) + eps)
  elif score == "softplus":
    eps = params.get("eps", 1e-8)
    sp = jnp.log1p(jnp.exp(jnp.log(jnp.maximum(n, 1.0)) * jnp.where(m, s, 0.0)))
    a = jnp.where(m, sp, 0.0)
    a = a / (a.sum(-1, keepdims=True) + eps)
    power = params.get("reweight_power")
    if power is not None:
      offset = jnp.where(n <= 3, 0.0, 1.0)
      a = jnp.where(m, jnp.maximum(a * n - offset, 0.0) ** power, 0.0)
      a = a / (a.sum(-1, keepdims=True) + eps)
    p = a
  else:
    raise ValueError(score)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def relative_error(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def with_x64(fn, *args, **kwargs):
  with jax.enable_x64(True):
    return jax.tree.map(np.asarray, fn(*args, **kwargs))

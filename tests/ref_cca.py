"""Naive float64 reference of CCA attention, written from the paper / the authors' dense ``generate_mask`` path
(1-based indices as in the paper, arXiv 2412.12465), independent of the fast path's index math."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.ops.scores import ScoreContext, get_score


def ref_mask(seq_len: int, group_size: int, window_size: int) -> np.ndarray:
  """(L, m + L) bool mask over [core tokens ; raw tokens], m = floor((L - s) / g) pooled groups (0 if L <= s)."""
  g, s, n = group_size, window_size, seq_len
  m = (n - s) // g if n > s else 0
  mask = np.zeros((n, m + n), bool)
  for t in range(1, n + 1):
    if t <= s:
      mask[t - 1, m:m + t] = True  # plain causal
      continue
    last_core = (t - s) // g
    for p in range(1, m + 1):
      mask[t - 1, p - 1] = p <= last_core
    for j in range(g * last_core + 1, t + 1):
      mask[t - 1, m + j - 1] = True
  return mask


def ref_core(q, k, v, group_size, num_groups):
  """Core k/v (B, m, H, d) per query head from explicit loops over groups."""
  b, n, h, d = q.shape
  rep = h // k.shape[2]
  k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  ck, cv = [], []
  for p in range(num_groups):
    sl = slice(p * group_size, (p + 1) * group_size)
    q_last = q[:, (p + 1) * group_size - 1]  # (B, H, d)
    logits = jnp.einsum("bhd,bjhd->bhj", q_last, k[:, sl]) / math.sqrt(d)
    w = jnp.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    ck.append(jnp.einsum("bhj,bjhd->bhd", w, k[:, sl]))
    cv.append(jnp.einsum("bhj,bjhd->bhd", w, v[:, sl]))
  if not ck:
    return jnp.zeros((b, 0, h, d), q.dtype), jnp.zeros((b, 0, h, v.shape[-1]), q.dtype)
  return jnp.stack(ck, 1), jnp.stack(cv, 1)


def ref_cca(q, k, v, *, group_size, window_size, score="softmax", scale=None, sink_logits=None, **params):
  """o = weights([q K_c ; q K] * scale masked by ref_mask) [V_c ; V], float64."""
  with jax.enable_x64(True):
    q, k, v = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
    b, n, h, d = q.shape
    mask = ref_mask(n, group_size, window_size)
    m = mask.shape[1] - n
    ck, cv = ref_core(q, k, v, group_size, m)
    rep = h // k.shape[2]
    keys = jnp.concatenate([ck, jnp.repeat(k, rep, axis=2)], axis=1)
    vals = jnp.concatenate([cv, jnp.repeat(v, rep, axis=2)], axis=1)
    fn = get_score(score)
    ctx = ScoreContext(q_len=n, kv_len=n, head_dim=d)
    if fn.prepare is not None:
      q, keys, scale = fn.prepare(q, keys, scale, ctx, **params)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, keys) * scale
    mask = jnp.asarray(mask)[None, None]
    if score == "softmax":
      e = jnp.where(mask, jnp.exp(jnp.where(mask, logits, -jnp.inf) - logits.max(-1, keepdims=True)), 0.0)
      denom = e.sum(-1, keepdims=True)
      if sink_logits is not None:
        denom = denom + jnp.exp(jnp.asarray(sink_logits, jnp.float64)[None, :, None, None]
                                - logits.max(-1, keepdims=True))
      w = e / denom
    else:
      w = fn.weights(logits, mask, ctx=ctx, **params)
    return jnp.einsum("bhqk,bkhd->bqhd", w, vals)

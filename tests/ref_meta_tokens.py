"""Naive float64 reference of meta-attention: dense mask written out with Python loops, masked softmax."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def ref_mask(is_meta, mode, segment_ids=None):
  is_meta = np.asarray(is_meta)
  b, n = is_meta.shape
  m = np.zeros((b, n, n), bool)
  for r in range(b):
    for i in range(n):
      for j in range(i + 1):
        ok = is_meta[r, j] and (is_meta[r, i] or mode == "all")
        if segment_ids is not None:
          ok = ok and segment_ids[r, i] == segment_ids[r, j]
        m[r, i, j] = ok
  return m


def ref_meta_attention(q, k, v, is_meta, mode, segment_ids=None):
  q, k, v = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  mask = jnp.asarray(ref_mask(is_meta, mode, segment_ids))[:, None]
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  s = jnp.where(mask, s, -1e300)
  e = jnp.where(mask, jnp.exp(jnp.where(mask, s - s.max(-1, keepdims=True), 0.0)), 0.0)
  z = e.sum(-1, keepdims=True)
  w = e / jnp.where(z > 0, z, 1.0)
  return jnp.einsum("bhqk,bkhd->bqhd", w, v)

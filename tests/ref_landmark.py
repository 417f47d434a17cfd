"""Naive float64 reference of landmark attention: explicit per-block softmaxes on dense one-hot masks.

Written straight from the closed form of Mohtashami & Jaggi 2023 (arXiv 2305.16300), independently of the segmented-scan
implementation: an outer softmax over current-block tokens and past landmarks, an inner softmax per past block
(a (batch, heads, q, block, key) tensor), and ``a_ij = P(landmark of blk(j)) · inner_blk(j)(j)``.
"""

from __future__ import annotations

import jax.numpy as jnp


def _masked_softmax(s, mask):
  s = jnp.where(mask, s, -1e300)
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.where(mask, jnp.exp(jnp.where(mask, s - m, 0.0)), 0.0)
  z = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(z > 0, z, 1.0)


def ref_weights(s, is_mem, query_index, visible=None):
  """s: (b, h, q, K) float64; is_mem: (b, K) bool; query_index: (q,); visible: bool broadcastable to s."""
  b, h, q, kv = s.shape
  mem = jnp.asarray(is_mem, bool)
  blk = jnp.cumsum(mem.astype(jnp.int32), -1) - mem.astype(jnp.int32)  # (b, K)
  vis = jnp.arange(kv)[None, :] <= jnp.asarray(query_index)[:, None]
  if visible is not None:
    vis = vis & visible
  vis = jnp.broadcast_to(vis, s.shape)
  k_blk = blk[:, None, None, :]
  q_blk = blk[:, jnp.asarray(query_index)][:, None, :, None]
  k_mem = mem[:, None, None, :]
  current = vis & ~k_mem & (k_blk == q_blk)
  past_landmark = vis & k_mem & (k_blk < q_blk)
  outer = _masked_softmax(s, current | past_landmark)  # (b, h, q, K)

  groups = jnp.arange(kv)
  member = (blk[:, None, :] == groups[None, :, None]) & ~mem[:, None, :]  # (b, G, K)
  closes = (blk[:, None, :] == groups[None, :, None]) & mem[:, None, :]  # (b, G, K)
  inner_mask = member[:, None, None] & vis[:, :, :, None, :]  # (b, h, q, G, K)
  inner = _masked_softmax(s[:, :, :, None, :], inner_mask)
  gate_prob = jnp.einsum("bhqk,bgk->bhqg", jnp.where(past_landmark, outer, 0.0), closes.astype(s.dtype))
  past = jnp.einsum("bhqg,bhqgk->bhqk", gate_prob, inner)
  return jnp.where(current, outer, 0.0) + jnp.where(~k_mem & (k_blk < q_blk), past, 0.0)


def ref_landmark_attention(q, k, v, is_mem, segment_ids=None, scale=None):
  """Full-sequence landmark attention, float64. q (b, n, H, d); k, v (b, n, Hkv, d)."""
  q, k, v = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  visible = None
  if segment_ids is not None:
    visible = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  w = ref_weights(s, is_mem, jnp.arange(q.shape[1]), visible)
  return jnp.einsum("bhqk,bkhd->bqhd", w, v)

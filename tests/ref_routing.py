"""Naive float64 references for routing attention: routing sets built by explicit Python loops, then dense masked
softmax attention. Obviously correct and slow; for tests only."""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp


def ref_layer_norm(x, eps=1e-6):
  x = np.asarray(x, np.float64)
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def ref_scores(r, centroids):
  """(batch, heads, k, seq) similarities x̂_t·μ_c in float64."""
  return np.einsum("bnhd,hkd->bhkn", np.asarray(r, np.float64), np.asarray(centroids, np.float64))


def ref_nearest(r, centroids):
  """(batch, seq, heads) argmax cluster, by loops."""
  s = ref_scores(r, centroids)
  b, h, _, n = s.shape
  out = np.zeros((b, n, h), np.int64)
  for i in range(b):
    for j in range(h):
      for t in range(n):
        out[i, t, j] = int(np.argmax(s[i, j, :, t]))
  return out


def _seg(segment_ids, b, n):
  return np.zeros((b, n), np.int64) if segment_ids is None else np.asarray(segment_ids)


def balanced_masks(r, centroids, window, segment_ids=None):
  """member (b, h, k, n) and per-cluster pair masks (b, h, k, n, n): t sees s iff both are among the cluster's
  top-w tokens, s <= t and same segment."""
  s = ref_scores(r, centroids)
  b, h, k, n = s.shape
  seg = _seg(segment_ids, b, n)
  member = np.zeros((b, h, k, n), bool)
  pair = np.zeros((b, h, k, n, n), bool)
  for i in range(b):
    for j in range(h):
      for c in range(k):
        chosen = sorted(np.argsort(-s[i, j, c], kind="stable")[:window].tolist())
        assert len(chosen) == window
        for t in chosen:
          member[i, j, c, t] = True
          for u in chosen:
            if u <= t and seg[i, u] == seg[i, t]:
              pair[i, j, c, t, u] = True
  return member, pair


def nearest_mask(cluster, window, segment_ids=None):
  """(b, h, n, n): t sees s iff s is among the last `window` tokens <= t of t's cluster, in t's segment."""
  cluster = np.asarray(cluster)
  b, n, h = cluster.shape
  seg = _seg(segment_ids, b, n)
  mask = np.zeros((b, h, n, n), bool)
  for i in range(b):
    for j in range(h):
      for t in range(n):
        members = [s for s in range(t + 1) if cluster[i, s, j] == cluster[i, t, j]][-window:]
        for s in members:
          mask[i, j, t, s] = seg[i, s] == seg[i, t]
  return mask


def local_ref_mask(n, block, segment_ids=None, b=1):
  seg = _seg(segment_ids, b, n)
  mask = np.zeros((b, 1, n, n), bool)
  for i in range(b):
    for t in range(n):
      for s in range(t + 1):
        mask[i, 0, t, s] = s // block >= t // block - 1 and seg[i, s] == seg[i, t]
  return mask


def _softmax_masked(logits, mask):
  z = jnp.where(mask, logits, -jnp.inf)
  z = z - jnp.max(jnp.where(mask, z, -1e300), axis=-1, keepdims=True)
  e = jnp.where(mask, jnp.exp(z), 0.0)
  return e / jnp.maximum(e.sum(-1, keepdims=True), 1e-300)


def dense_attention(q, k, v, mask, scale):
  """q, k, v (b, n, h, d) float64; mask (b, h|1, n, n). Returns (b, n, h, dv)."""
  logits = jnp.einsum("bthd,bshd->bhts", q, k) * scale
  p = _softmax_masked(logits, jnp.asarray(mask))
  return jnp.einsum("bhts,bshd->bthd", p, v)


def balanced_attention_ref(qk, v, member, pair, scale):
  """Mean over a token's clusters of causal attention inside each cluster."""
  logits = jnp.einsum("bthd,bshd->bhts", qk, qk) * scale
  p = _softmax_masked(logits[:, :, None], jnp.asarray(pair))  # (b, h, k, n, n)
  o = jnp.einsum("bhkts,bshd->bhktd", p, v)
  o = (o * jnp.asarray(member)[..., None]).sum(2)
  count = np.maximum(member.sum(2), 1)[..., None]
  return (o / count).transpose(0, 2, 1, 3)


def kmeans_update_ref(ema_count, ema_sum, r, cluster, decay, eps):
  """Token-by-token accumulation, then EMA and Laplace smoothing, in float64."""
  ema_count = np.asarray(ema_count, np.float64)
  ema_sum = np.asarray(ema_sum, np.float64)
  r = np.asarray(r, np.float64)
  h, k = ema_count.shape
  counts = np.zeros((h, k))
  sums = np.zeros(ema_sum.shape)
  for i in range(r.shape[0]):
    for t in range(r.shape[1]):
      for j in range(h):
        counts[j, cluster[i, t, j]] += 1
        sums[j, cluster[i, t, j]] += r[i, t, j]
  count = decay * ema_count + (1 - decay) * counts
  total = decay * ema_sum + (1 - decay) * sums
  n = count.sum(-1, keepdims=True)
  smoothed = (count + eps) / (n + k * eps) * n
  return count, total, total / smoothed[..., None]


"""Clustered (routing) attention of the Routing Transformer (Roy et al., TACL 2021), two routing rules.

Routing heads share queries and keys: ``x̂ = LN(q)`` routes (see :mod:`.kmeans`) and the attention logits are
``scale · x̂'_i·x̂'_j`` where ``x̂'`` is ``x̂`` or a rotated copy of it (RoPE); ``scale`` defaults to ``1/√d``
(the google-research code uses 1).

``balanced`` (the google-research reference): each cluster ``c`` takes its ``w`` best tokens over the WHOLE
sequence, ``S_c = top-w_t x̂_t·μ_c`` sorted by position; causal softmax attention inside every ``S_c``; a token's
output is the mean over the clusters that contain it (0 if none)::

    o_t = (1/|{c: t ∈ S_c}|) Σ_{c: t ∈ S_c} Σ_{s ∈ S_c, s ≤ t} softmax_s(scale·x̂'_t·x̂'_s) v_s

Membership of token t depends on the scores of later tokens, so this rule is NOT causal (a perturbation of the
future changes the past outputs). Cost O(n·k·d + k·w²·d).

``nearest`` (the causal rule, the default for LM training): every token joins its nearest centroid
``c(t) = argmax_c x̂_t·μ_c`` (unbalanced clusters) and attends causally to the ``w`` most recent members of its
cluster, itself included::

    o_t = Σ_{s ∈ R_t} softmax_s(scale·x̂'_t·x̂'_s) v_s,   R_t = the last w of {s ≤ t : c(s) = c(t)}

``R_t`` depends on positions ≤ t only. Vectorised like Reformer's LSH attention: sort tokens by (cluster,
position), cut the sorted sequence into chunks of ``w``, let each chunk attend to itself and the previous chunk
under the mask "same cluster and 0 ≤ rank_t − rank_s < w" (so the chunking never changes the result).
Cost O(n log n + n·2w·d).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnlab.attention.blocked import blocked_attention
from attnlab.ops.dense import attention_weights
from attnlab.attention.routing.kmeans import centroid_scores
from attnlab.attention.routing.local import NEG

ROUTINGS = ("nearest", "balanced")


def _check(qk: jax.Array, v: jax.Array, window: int) -> None:
  if qk.ndim != 4 or v.ndim != 4 or qk.shape[:3] != v.shape[:3]:
    raise ValueError(f"qk and v must be (batch, seq, heads, dim) agreeing in (batch, seq, heads); got "
                     f"{tuple(qk.shape)} and {tuple(v.shape)}")
  if window <= 0:
    raise ValueError(f"window must be positive; got {window}")


def _segments(segment_ids: jax.Array | None, b: int, n: int) -> jax.Array:
  if segment_ids is None:
    return jnp.zeros((b, n), jnp.int32)
  if segment_ids.shape != (b, n):
    raise ValueError(f"segment_ids must be (batch, seq) = {(b, n)}; got {tuple(segment_ids.shape)}")
  return segment_ids.astype(jnp.int32)


def _masked_softmax(s: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.where(mask, jax.nn.softmax(jnp.where(mask, s, NEG), axis=-1), 0.0)


def balanced_assignment(r: jax.Array, centroids: jax.Array, window: int) -> jax.Array:
  """Balanced top-w membership: int32 (batch, heads, k, w) token indices per cluster, ascending."""
  if not 0 < window <= r.shape[1]:
    raise ValueError(f"window must be in [1, seq={r.shape[1]}] for balanced routing; got {window}")
  _, idx = jax.lax.top_k(centroid_scores(r, centroids), window)
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


def balanced_attention(qk: jax.Array, v: jax.Array, idx: jax.Array, *, scale: float | None = None,
                       segment_ids: jax.Array | None = None) -> jax.Array:
  """Causal attention inside each cluster ``idx`` (batch, heads, k, w), averaged over a token's clusters.

  qk: (batch, seq, heads, d) shared queries/keys; v: (batch, seq, heads, dv). Returns (batch, seq, heads, dv).
  """
  b, n, h, d = qk.shape
  _check(qk, v, idx.shape[-1])
  k, w = idx.shape[2], idx.shape[3]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  seg = _segments(segment_ids, b, n)
  flat = idx.reshape(b, h, k * w)
  gather = lambda x: jnp.take_along_axis(x, flat[..., None], axis=2).reshape(b, h, k, w, x.shape[-1])
  qc = gather(qk.astype(jnp.float32).transpose(0, 2, 1, 3))  # (b, h, k, w, d)
  vc = gather(v.astype(jnp.float32).transpose(0, 2, 1, 3))
  sc = jnp.take_along_axis(seg[:, None, :], flat, axis=2).reshape(b, h, k, w)
  mask = jnp.tril(jnp.ones((w, w), bool)) & (sc[..., :, None] == sc[..., None, :])  # sorted order = time order
  p = _masked_softmax(jnp.einsum("bhkqd,bhksd->bhkqs", qc, qc) * scale, mask)
  oc = jnp.einsum("bhkqs,bhksd->bhkqd", p, vc).reshape(b, h, k * w, -1)
  ib, ih = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
  out = jnp.zeros((b, h, n, v.shape[-1]), jnp.float32).at[ib, ih, flat].add(oc)
  count = jnp.zeros((b, h, n), jnp.float32).at[ib, ih, flat].add(1.0)
  out = out / jnp.maximum(count, 1.0)[..., None]
  return out.transpose(0, 2, 1, 3).astype(qk.dtype)


def _chunks(x: jax.Array, window: int, fill) -> jax.Array:
  """(b, h, n, ...) -> (b, h, 1 + ceil(n/w), w, ...) with one leading padding chunk and a padded tail."""
  n = x.shape[2]
  pad = [(0, 0)] * x.ndim
  pad[2] = (window, math.ceil(n / window) * window - n)
  x = jnp.pad(x, pad, constant_values=fill)
  return x.reshape(x.shape[:2] + (-1, window) + x.shape[3:])


def _with_previous(x: jax.Array) -> jax.Array:
  return jnp.concatenate([x[:, :, :-1], x[:, :, 1:]], axis=3)


NEAREST_IMPLS = ("chunks", "blocked")


def _sorted_chunks(qs, vs, cs, ss, *, window: int, scale: float):
  """Attention in (cluster, position) order: chunks of ``window`` sorted tokens against themselves and the previous
  chunk under the mask "same cluster, same segment, 0 <= rank gap < window". Inputs (b, h, n, .)."""
  b, h, n, _ = qs.shape
  rank = jnp.broadcast_to(jnp.arange(n), (b, h, n))  # index in sorted order; same-cluster members are contiguous
  qc = _chunks(qs, window, 0.0)[:, :, 1:]  # (b, h, C, w, d)
  kc, vc = _with_previous(_chunks(qs, window, 0.0)), _with_previous(_chunks(vs, window, 0.0))  # (b, h, C, 2w, .)
  cq, ck = _chunks(cs, window, -1)[:, :, 1:], _with_previous(_chunks(cs, window, -2))
  rq, rk = _chunks(rank, window, 0)[:, :, 1:], _with_previous(_chunks(rank, window, 0))
  sq, sk = _chunks(ss, window, 0)[:, :, 1:], _with_previous(_chunks(ss, window, 0))
  gap = rq[..., :, None] - rk[..., None, :]
  mask = (cq[..., :, None] == ck[..., None, :]) & (gap >= 0) & (gap < window) & (sq[..., :, None] == sk[..., None, :])
  p = _masked_softmax(jnp.einsum("bhcqd,bhckd->bhcqk", qc, kc) * scale, mask)
  return jnp.einsum("bhcqk,bhckd->bhcqd", p, vc).reshape(b, h, -1, vs.shape[-1])[:, :, :n]


def _sorted_blocked(qs, vs, cs, ss, *, window: int, scale: float):
  """The same attention as :func:`_sorted_chunks` on the blocked flash core: in sorted order "0 <= rank gap <
  window" is a causal sliding window and "same cluster, same segment" a segment id, one per (batch, head) row."""
  b, h, n, _ = qs.shape
  first = jnp.min(ss)
  ids = (cs * (jnp.max(ss) - first + 1) + ss - first).reshape(b * h, n)
  fold = lambda x: x.reshape(b * h, n, 1, x.shape[-1])
  block = max(window, 32)
  out = blocked_attention(fold(qs), fold(qs), fold(vs), causal=True, window=window, scale=scale, segment_ids=ids,
                          block_q=block, block_kv=block)
  return out.reshape(b, h, n, vs.shape[-1])


def nearest_attention(qk: jax.Array, v: jax.Array, cluster: jax.Array, *, window: int,
                      scale: float | None = None, segment_ids: jax.Array | None = None,
                      impl: str = "chunks") -> jax.Array:
  """Causal routing: each token attends to the ``window`` most recent members of its cluster (itself included).

  qk: (batch, seq, heads, d); v: (batch, seq, heads, dv); cluster: int (batch, seq, heads).
  impl: ``"chunks"`` (one batched einsum over all chunks, O(n w) memory) or ``"blocked"`` (the blocked flash
  core, O(n) memory). On CPU (w = sqrt(n), benchmarks/efficient_vs_softmax.py) "blocked" took 1.2x the fwd+bwd
  time of "chunks" at n = 2k and about the same from 8k to 16k with half the temporaries, so "chunks" stays the
  default.
  Returns (batch, seq, heads, dv).
  """
  b, n, h, d = qk.shape
  _check(qk, v, window)
  if cluster.shape != (b, n, h):
    raise ValueError(f"cluster must be (batch, seq, heads) = {(b, n, h)}; got {tuple(cluster.shape)}")
  if impl not in NEAREST_IMPLS:
    raise ValueError(f"nearest_attention impl must be one of {NEAREST_IMPLS}; got {impl!r}")
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  seg = _segments(segment_ids, b, n)
  c = cluster.astype(jnp.int32).transpose(0, 2, 1)  # (b, h, n)
  perm = jnp.argsort(c * n + jnp.arange(n), axis=-1)  # sort by (cluster, position)
  take = lambda x: jnp.take_along_axis(x, perm[..., None], axis=2)
  qs = take(qk.astype(jnp.float32).transpose(0, 2, 1, 3))
  vs = take(v.astype(jnp.float32).transpose(0, 2, 1, 3))
  cs = jnp.take_along_axis(c, perm, axis=-1)
  ss = jnp.take_along_axis(jnp.broadcast_to(seg[:, None], (b, h, n)), perm, axis=-1)
  attend_sorted = _sorted_blocked if impl == "blocked" else _sorted_chunks
  out = attend_sorted(qs, vs, cs, ss, window=window, scale=scale)
  out = jnp.take_along_axis(out, jnp.argsort(perm, axis=-1)[..., None], axis=2)  # unsort
  return out.transpose(0, 2, 1, 3).astype(qk.dtype)


def routing_weights(qk: jax.Array, *, routing: str, window: int, idx: jax.Array | None = None,
                    cluster: jax.Array | None = None, scale: float | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
  """Dense effective weights (batch, heads, seq, seq) of either routing rule, for analysis (O(k·n²) memory)."""
  b, n, h, _ = qk.shape
  seg = _segments(segment_ids, b, n)
  same_seg = (seg[:, :, None] == seg[:, None, :])[:, None]  # (b, 1, n, n)
  causal = jnp.tril(jnp.ones((n, n), bool))
  if routing == "nearest":
    c = cluster.transpose(0, 2, 1)  # (b, h, n)
    same = c[..., :, None] == c[..., None, :]
    rank = (same & causal).sum(-1)  # 1-based rank of t among its cluster's members
    gap = rank[..., :, None] - rank[..., None, :]
    mask = same & causal & (gap < window) & same_seg
    return attention_weights(qk, qk, causal=False, scale=scale, mask=mask)
  if routing != "balanced":
    raise ValueError(f"routing must be one of {ROUTINGS}; got {routing!r}")
  member = jnp.zeros((b, h, idx.shape[2], n), bool).at[
      jnp.arange(b)[:, None, None, None], jnp.arange(h)[None, :, None, None],
      jnp.arange(idx.shape[2])[None, None, :, None], idx].set(True)  # (b, h, k, n)
  pair = member[..., :, None] & member[..., None, :] & causal & same_seg[:, :, None]  # (b, h, k, n, n)
  s = jnp.einsum("bqhd,bkhd->bhqk", qk.astype(jnp.float32), qk.astype(jnp.float32))
  s = s * (1.0 / math.sqrt(qk.shape[-1]) if scale is None else scale)
  p = _masked_softmax(s[:, :, None], pair).sum(2)
  return p / jnp.maximum(member.sum(2), 1)[..., None]

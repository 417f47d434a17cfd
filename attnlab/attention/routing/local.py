"""Blocked local causal attention (the local heads beside the routing heads of the Routing Transformer).

The sequence is cut into blocks of ``L`` positions; a query in block ``i`` attends causally to the keys of blocks
``i − 1`` and ``i`` (``query_shape = memory_flange = L`` in tensor2tensor's ``local_attention_1d``):

    visible(t, s) = s ≤ t  and  ⌊s/L⌋ ≥ ⌊t/L⌋ − 1          (and the same segment when packing)

Cost O(n·2L·d) per head.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG = -1e30


def local_mask(seq: int, block: int) -> jax.Array:
  """Dense (seq, seq) boolean mask of blocked local causal attention (for analysis)."""
  t, s = jnp.arange(seq)[:, None], jnp.arange(seq)[None, :]
  return (s <= t) & (s // block >= t // block - 1)


def _blocks(x: jax.Array, block: int, fill) -> jax.Array:
  """(batch, n, ...) -> (batch, 1 + ceil(n/L), L, ...): one leading padding block, tail padded to whole blocks."""
  n = x.shape[1]
  tail = math.ceil(n / block) * block - n
  pad = [(0, 0)] * x.ndim
  pad[1] = (block, tail)
  x = jnp.pad(x, pad, constant_values=fill)
  return x.reshape((x.shape[0], -1, block) + x.shape[2:])


def _with_previous(x: jax.Array) -> jax.Array:
  """(batch, C + 1, L, ...) blocks -> (batch, C, 2L, ...): block i − 1 followed by block i, for i = 1..C."""
  return jnp.concatenate([x[:, :-1], x[:, 1:]], axis=2)


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block: int, scale: float | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
  """Blocked local causal softmax attention.

  Args:
    q, k, v: (batch, seq, heads, head_dim), one kv head per query head.
    block: block length L (need not divide seq; the tail is padded).
    scale: logit scale, default ``1/sqrt(head_dim)``.
    segment_ids: optional (batch, seq) ids; queries see only keys of their own segment.

  Returns:
    (batch, seq, heads, head_dim) in q.dtype.
  """
  if q.ndim != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3]:
    raise ValueError(f"q, k, v must be (batch, seq, heads, head_dim) with equal shapes; got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  if block <= 0:
    raise ValueError(f"block must be positive; got {block}")
  b, n, _, d = q.shape
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  pos = jnp.broadcast_to(jnp.arange(n), (b, n))
  seg = jnp.zeros((b, n), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  qb = _blocks(q.astype(jnp.float32), block, 0.0)[:, 1:]  # (b, C, L, h, d)
  kb = _with_previous(_blocks(k.astype(jnp.float32), block, 0.0))  # (b, C, 2L, h, d)
  vb = _with_previous(_blocks(v.astype(jnp.float32), block, 0.0))
  pq = _blocks(pos, block, n)[:, 1:]  # tail padding queries sit "after" every key
  pk = _with_previous(_blocks(pos, block, -1))
  sq = _blocks(seg, block, -1)[:, 1:]
  sk = _with_previous(_blocks(seg, block, -2))
  mask = (pk[:, :, None, :] <= pq[:, :, :, None]) & (pk[:, :, None, :] >= 0) & \
      (sk[:, :, None, :] == sq[:, :, :, None])  # (b, C, L, 2L)
  s = jnp.einsum("bcqhd,bckhd->bchqk", qb, kb) * scale
  m = mask[:, :, None]
  p = jnp.where(m, jax.nn.softmax(jnp.where(m, s, NEG), axis=-1), 0.0)
  o = jnp.einsum("bchqk,bckhd->bcqhd", p, vb)
  return o.reshape((b, -1) + o.shape[3:])[:, :n].astype(q.dtype)

"""Block math shared by the GPU and TPU flash kernels and the pure-JAX blocked path: one function per step,
generic over the score function.

The kernels and :mod:`attnlab.attention.blocked` call exactly these functions on one (block_q, block_kv) tile;
they differ only in how tiles are scheduled (a Triton-style loop over key blocks, a TPU grid axis with VMEM
scratch, lax loops over batched (batch, kv_heads, group) tiles). The score function enters only through its
:class:`attnlab.ops.scores.registry.Blockwise` hooks. Row vectors are (..., rows, 1), tiles (..., rows, keys).

Visibility of key j to the query at absolute position p = i + kv_len - q_len (end alignment): causal ``j <= p``;
sliding window W ``p - W < j <= p``; segments ``seg_q(i) == seg_k(j)``. Tiles with no visible pair are skipped
(:func:`kv_block_range`, :func:`q_block_range`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.ops.scores.registry import Blockwise
from kernels_pallas.flash.config import BlockSizes

# Finite stand-in for -inf in running maxima (exp(MASK - m) underflows to 0, never NaN).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class FlashStatic:
  """Everything static about one flash call (hashable: a non-differentiable argument of the custom_vjp)."""

  score: Blockwise
  causal: bool
  scale: float
  blocks: BlockSizes
  q_len: int
  kv_len: int
  groups: int  # query heads per kv head
  has_segments: bool
  has_sinks: bool
  interpret: bool
  window: int | None = None  # sliding window W: keys p - W < j <= p
  kv_valid: int | None = None  # keys at or beyond this index are padding (the blocked path pads to whole blocks)

  @property
  def offset(self) -> int:
    """Queries are aligned to the end of the keys: query i sits at key position i + offset."""
    return self.kv_len - self.q_len


def dot(a, b, dims=(((1,), (0,)), ((), ()))):
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _and(a, b):
  return b if a is None else jnp.logical_and(a, b)


def block_mask(st: FlashStatic, q_start, k_start, bq: int, bk: int, q_seg, k_seg):
  """(bq, bk) visibility of a tile (or None when everything is visible): causal AND window AND same segment AND
  not padding. ``q_seg`` (..., bq, 1) and ``k_seg`` (..., 1, bk) broadcast the result to their leading axes."""
  mask = None
  k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  if st.causal or st.window is not None:
    q_pos = q_start + st.offset + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    mask = k_pos <= q_pos
    if st.window is not None:
      mask = jnp.logical_and(mask, k_pos > q_pos - st.window)
  if st.kv_valid is not None:
    mask = _and(mask, k_pos < st.kv_valid)
  if q_seg is not None:
    same = q_seg == k_seg  # (bq, 1) == (1, bk)
    mask = same if mask is None else jnp.logical_and(mask, same)
  return mask


def init_state(st: FlashStatic, sink, n, bq: int, head_dim: int, lead: tuple[int, ...] = ()):
  """(m, l, acc) before the first key block, rows of shape lead + (bq, 1). A sink logit is a virtual key with
  value 0: m = sink, l = d(sink)."""
  score = st.score
  rows = (*lead, bq, 1)
  if score.online and st.has_sinks:
    m = jnp.broadcast_to(sink, rows).astype(jnp.float32)
    _, l = score.block(m, m, n)
    l = jnp.broadcast_to(l, rows)
  else:
    m0 = MASK_VALUE if score.online and score.init_shift == -np.inf else float(score.init_shift)
    m = jnp.full(rows, m0 if score.online else 0.0, jnp.float32)
    l = jnp.zeros(rows, jnp.float32)
  return m, l, jnp.zeros((*lead, bq, head_dim), jnp.float32)


def logits(st: FlashStatic, q, k):
  return dot(q, k, NT) * st.scale


def fwd_block(st: FlashStatic, s, mask, n, v, m, l, acc, matmul=dot):
  """Folds one key block into the row state: online rescaling if the score has a running shift.
  ``matmul(u, v)`` is ``u @ v`` (the blocked path passes a batched one)."""
  score = st.score
  if score.online:
    s_max = s if mask is None else jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s_max, axis=-1, keepdims=True))
    alpha = jnp.exp(m - m_new)
  else:
    m_new, alpha = m, None
  s_safe = s if mask is None else jnp.where(mask, s, 0.0)
  u, d = score.block(s_safe, m_new, n)
  if mask is not None:
    u = jnp.where(mask, u, 0.0)
    d = jnp.where(mask, d, 0.0)
  pv = matmul(u.astype(v.dtype), v)
  d_sum = jnp.sum(d, axis=-1, keepdims=True) if score.uses_sum else 0.0
  if alpha is None:
    return m_new, l + d_sum, acc + pv
  return m_new, alpha * l + d_sum, alpha * acc + pv


def finalize(st: FlashStatic, m, l, acc, n):
  """(o, r): o = acc / D, residual r = m + log D (the row log-sum-exp for softmax); empty rows give o = 0."""
  denom = st.score.denominator(l, m, n)
  denom = jnp.where(denom > 0, denom, 1.0)
  return acc / denom, m + jnp.log(denom)


def bwd_block(st: FlashStatic, s, mask, r, n, dp, delta):
  """(p, ds) of one tile, recomputed from the residual r."""
  s_safe = s if mask is None else jnp.where(mask, s, 0.0)
  p = st.score.probs(s_safe, r, n)
  ds = st.score.dlogits(s_safe, r, dp, delta, n)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
    ds = jnp.where(mask, ds, 0.0)
  return p, ds


def kv_block_range(st: FlashStatic, q_start, bq: int, bk: int, num_kv_blocks: int):
  """Key blocks [0, hi) that can be visible to queries [q_start, q_start + bq) (causal skips the rest)."""
  if not (st.causal or st.window is not None):
    return num_kv_blocks
  last_key = q_start + bq - 1 + st.offset
  return jnp.minimum(jax.lax.div(jnp.maximum(last_key + bk, 0), bk), num_kv_blocks)  # lax.div: no sign() on TPU


def kv_block_start(st: FlashStatic, q_start, bk: int, num_kv_blocks: int):
  """First key block that can be visible to queries from q_start on: 0, or under a window W the block of key
  ``q_start + offset - W + 1`` (the blocks below it are outside the band)."""
  if st.window is None:
    return 0
  first_key = jnp.maximum(q_start + st.offset - st.window + 1, 0)
  return jnp.minimum(jax.lax.div(first_key, bk), num_kv_blocks)


def kv_full_block_range(st: FlashStatic, q_start, bq: int, bk: int, lo, hi):
  """[full_lo, full_hi) within [lo, hi): the key blocks every query of [q_start, q_start + bq) sees entirely
  (inside the causal/window band, no padding), which need no mask. Empty (hi, hi) when segments are present."""
  if st.has_segments:
    return hi, hi
  full_hi = hi
  if st.causal or st.window is not None:  # key block j is below the diagonal of the block's first query
    full_hi = jnp.minimum(full_hi, jax.lax.div(jnp.maximum(q_start + st.offset + 1, 0), bk))
  if st.kv_valid is not None:
    full_hi = jnp.minimum(full_hi, st.kv_valid // bk)
  full_lo = lo
  if st.window is not None:  # and above the band's lower edge of the block's last query
    first_key = q_start + bq - 1 + st.offset - st.window + 1
    full_lo = jnp.maximum(lo, jax.lax.div(jnp.maximum(first_key + bk - 1, 0), bk))
  empty = full_lo >= full_hi
  return jnp.where(empty, hi, full_lo), jnp.where(empty, hi, full_hi)


def q_block_start(st: FlashStatic, k_start, bq: int, num_q_blocks: int):
  """First query block that can see keys from k_start on (causal), else 0."""
  if not (st.causal or st.window is not None):
    return 0
  first_query = jnp.maximum(k_start - st.offset, 0)
  return jnp.minimum(jax.lax.div(first_query, bq), num_q_blocks)


def q_block_end(st: FlashStatic, k_start, bq: int, bk: int, num_q_blocks: int):
  """Query blocks [.., hi) that can see keys [k_start, k_start + bk): all, or under a window W up to the query at
  position ``k_start + bk - 1 + W - 1``."""
  if st.window is None:
    return num_q_blocks
  last_query = k_start + bk - 1 + st.window - 1 - st.offset
  return jnp.clip(jax.lax.div(jnp.maximum(last_query + bq, 0), bq), 0, num_q_blocks)


def visible_counts(st: FlashStatic, q_seg, kv_seg, *, batch: int, q_len: int, kv_len: int, block_kv: int):
  """n_i, the number of keys visible to each query, (B, Q, 1) float32, in O(Q * block_kv) memory. ``q_seg``
  (B, Q, 1), ``kv_seg`` (B, 1, K) or None; ``q_len``/``kv_len`` the (possibly padded) array lengths."""
  def add_block(j, n):
    k_seg = None if kv_seg is None else jax.lax.dynamic_slice_in_dim(kv_seg, j * block_kv, block_kv, axis=2)
    visible = block_mask(st, 0, j * block_kv, q_len, block_kv, q_seg, k_seg)
    if visible is None:
      return n + block_kv
    return n + jnp.sum(jnp.broadcast_to(visible, (batch, q_len, block_kv)), axis=2, keepdims=True, dtype=jnp.float32)

  return jax.lax.fori_loop(0, kv_len // block_kv, add_block, jnp.zeros((batch, q_len, 1), jnp.float32))


def kv_head(h, groups: int):
  """The kv head read by query head h (GQA)."""
  return jax.lax.div(h, groups) if groups > 1 else h

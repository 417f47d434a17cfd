"""Block math shared by the GPU and TPU flash kernels: one function per step, generic over the score function.

Both kernels call exactly these functions on one (block_q, block_kv) tile; they differ only in how tiles are
scheduled (a Triton-style loop over key blocks vs. a TPU grid axis with VMEM scratch). The score function enters
only through its :class:`attnlab.ops.scores.registry.Blockwise` hooks.
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

  @property
  def offset(self) -> int:
    """Queries are aligned to the end of the keys: query i sits at key position i + offset."""
    return self.kv_len - self.q_len


def dot(a, b, dims=(((1,), (0,)), ((), ()))):
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def block_mask(st: FlashStatic, q_start, k_start, bq: int, bk: int, q_seg, k_seg):
  """(bq, bk) visibility of a tile (or None when everything is visible): causal AND same segment."""
  mask = None
  if st.causal:
    q_pos = q_start + st.offset + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    mask = k_pos <= q_pos
  if q_seg is not None:
    same = q_seg == k_seg  # (bq, 1) == (1, bk)
    mask = same if mask is None else jnp.logical_and(mask, same)
  return mask


def init_state(st: FlashStatic, sink, n, bq: int, head_dim: int):
  """(m, l, acc) before the first key block. A sink logit is a virtual key with value 0: m = sink, l = d(sink)."""
  score = st.score
  if score.online and st.has_sinks:
    m = jnp.broadcast_to(sink, (bq, 1)).astype(jnp.float32)
    _, l = score.block(m, m, n)
  else:
    m0 = MASK_VALUE if score.online and score.init_shift == -np.inf else float(score.init_shift)
    m = jnp.full((bq, 1), m0 if score.online else 0.0, jnp.float32)
    l = jnp.zeros((bq, 1), jnp.float32)
  return m, l, jnp.zeros((bq, head_dim), jnp.float32)


def logits(st: FlashStatic, q, k):
  return dot(q, k, NT) * st.scale


def fwd_block(st: FlashStatic, s, mask, n, v, m, l, acc):
  """Folds one key block into the row state: online rescaling if the score has a running shift."""
  score = st.score
  if score.online:
    s_max = s if mask is None else jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s_max, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
  else:
    m_new, alpha = m, None
  s_safe = s if mask is None else jnp.where(mask, s, 0.0)
  u, d = score.block(s_safe, m_new, n)
  if mask is not None:
    u = jnp.where(mask, u, 0.0)
    d = jnp.where(mask, d, 0.0)
  pv = dot(u.astype(v.dtype), v)
  d_sum = jnp.sum(d, axis=1, keepdims=True) if score.uses_sum else 0.0
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
  if not st.causal:
    return num_kv_blocks
  last_key = q_start + bq - 1 + st.offset
  return jnp.minimum(jax.lax.div(jnp.maximum(last_key + bk, 0), bk), num_kv_blocks)  # lax.div: no sign() on TPU


def q_block_start(st: FlashStatic, k_start, bq: int, num_q_blocks: int):
  """First query block that can see keys from k_start on (causal), else 0."""
  if not st.causal:
    return 0
  first_query = jnp.maximum(k_start - st.offset, 0)
  return jnp.minimum(jax.lax.div(first_query, bq), num_q_blocks)


def kv_head(h, groups: int):
  """The kv head read by query head h (GQA)."""
  return jax.lax.div(h, groups) if groups > 1 else h

"""Landmark attention's grouped softmax (Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access Infinite
Context Length for Transformers", arXiv 2305.16300).

The keys are cut into blocks, each closed by a landmark token. With ``blk(j)`` = number of landmarks strictly
before key ``j`` and query ``i`` sitting at key index ``ι(i)`` in block ``c = blk(ι(i))``::

    C_i  = {j <= ι(i) : not landmark, blk(j) = c}  ∪  {ℓ < ι(i) : landmark, blk(ℓ) < c}     (visible keys only)
    Z_i  = Σ_{j ∈ C_i} exp(s_ij)
    a_ij = exp(s_ij) / Z_i                                                       j in the current block
    a_ij = [exp(s_iℓ(j)) / Z_i] · exp(s_ij) / Σ_{j' ∈ blk(j), not landmark} exp(s_ij')   j in a past block,
                                                                                 ℓ(j) = the landmark closing it
    a_iℓ = 0                                                                     landmark values are never read
    o_i  = Σ_j a_ij v_j

The landmark of the query's own block is never a candidate (not even for the landmark's own query). With no
landmark before the query this is causal softmax attention over its block. This equals the reference
``landmark_grouped_softmax`` (epfml/landmark-attention, lm_benchmark/models/landmark.py) for block-aligned and
random-offset landmark layouts.

Vectorised with O(q·K) work and memory, like dense attention: one logsumexp over the outer candidates, an
in-block logsumexp per block computed with segment max/sum over the key axis (segments = blocks, so blocks may
have any length and any offset), and one gather at each key's closing landmark (its gate logit).
Every intermediate stays finite (masked logits are ``NEG``, not ``-inf``) so gradients never meet ``0 * inf``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG = -1e30  # finite "minus infinity" for masked logits


def _block_logsumexp(x: jax.Array, blk: jax.Array) -> jax.Array:
  """``lse_{j' : blk(j') = blk(j)} x_ij'`` for every key j: x (b, h, q, K), blk (b, K) non-decreasing block ids.

  Segment ops over the key axis (batch rows get disjoint segment ids), stabilised by the per-block maximum, so
  a block far below the row maximum keeps full relative precision.
  """
  b, h, q, kv = x.shape
  ids = (blk + kv * jnp.arange(b)[:, None]).reshape(-1)
  xt = x.transpose(0, 3, 1, 2).reshape(b * kv, h, q)
  seg = dict(num_segments=b * kv, indices_are_sorted=True)
  mx = jax.lax.stop_gradient(jax.ops.segment_max(xt, ids, **seg))[ids]
  lse = jnp.log(jax.ops.segment_sum(jnp.exp(xt - mx), ids, **seg))[ids] + mx
  return lse.reshape(b, kv, h, q).transpose(0, 2, 3, 1)


def block_ids(is_landmark: jax.Array) -> jax.Array:
  """``blk(j)``: number of landmarks strictly before position j (a landmark belongs to the block it closes)."""
  m = is_landmark.astype(jnp.int32)
  return jnp.cumsum(m, axis=-1) - m


def grouped_softmax_weights(s: jax.Array, key_is_landmark: jax.Array, query_index: jax.Array,
                            visible: jax.Array | None = None) -> jax.Array:
  """Dense landmark weights ``a_ij`` from logits.

  Args:
    s: (batch, heads, q_len, kv_len) logits ``s_ij``. The key layout may differ per query (retrieval at
      inference), but the landmark pattern ``key_is_landmark`` is shared by all queries of a batch row.
    key_is_landmark: (batch, kv_len) bool.
    query_index: (q_len,) int, the key index of each query (its own key); keys after it are invisible.
    visible: optional bool mask broadcastable to ``s`` (segments, empty cache slots); ANDed with causality.

  Returns:
    (batch, heads, q_len, kv_len) weights in ``s.dtype``; landmark columns are 0; rows sum to 1, except that
    the gate mass of a past block without ordinary tokens (two landmarks in a row) is lost, as in the reference,
    and a query without candidates (a landmark opening the sequence) gets a zero row.
  """
  if s.ndim != 4:
    raise ValueError(f"logits must be (batch, heads, q_len, kv_len); got shape {tuple(s.shape)}")
  b, _, q_len, kv_len = s.shape
  if key_is_landmark.shape != (b, kv_len):
    raise ValueError(f"key_is_landmark must be (batch, kv_len) = {(b, kv_len)}; got {tuple(key_is_landmark.shape)}")
  if query_index.shape != (q_len,):
    raise ValueError(f"query_index must be (q_len,) = ({q_len},); got {tuple(query_index.shape)}")
  key_is_landmark = key_is_landmark.astype(bool)
  blk = block_ids(key_is_landmark)
  k_blk = blk[:, None, None, :]
  q_blk = blk[:, query_index][:, None, :, None]
  mem = key_is_landmark[:, None, None, :]
  vis = jnp.arange(kv_len)[None, :] <= query_index[:, None]
  if visible is not None:
    vis = jnp.logical_and(vis, visible)
  vis = jnp.broadcast_to(vis, s.shape)

  current = vis & ~mem & (k_blk == q_blk)
  earlier = vis & (k_blk < q_blk)
  gate = earlier & mem
  log_z = jax.nn.logsumexp(jnp.where(current | gate, s, NEG), axis=-1, keepdims=True)

  past = earlier & ~mem
  lse_blk = _block_logsumexp(jnp.where(past, s, NEG), blk)
  closing = jnp.where(key_is_landmark, jnp.arange(kv_len), kv_len)
  closing = jnp.minimum(jax.lax.cummin(closing, axis=1, reverse=True), kv_len - 1)
  at_closing = lambda x: jnp.take_along_axis(x, jnp.broadcast_to(closing[:, None, None, :], s.shape), axis=-1)
  past = past & at_closing(gate)
  past_logit = s - lse_blk + at_closing(s) - log_z
  return jnp.exp(jnp.where(current, s - log_z, jnp.where(past, past_logit, NEG)))


def _check_qkv(q, k, v, is_landmark):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 (batch, seq, heads, head_dim); got shape {tuple(x.shape)}")
  if k.shape != v.shape[:3] + (k.shape[3],):
    raise ValueError(f"k and v must agree in (batch, seq, num_kv_heads); got k {k.shape}, v {v.shape}")
  if q.shape[:2] != k.shape[:2]:
    raise ValueError(f"landmark training attention needs q and k of the same (batch, seq); got {q.shape}, {k.shape}")
  if q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
    raise ValueError(f"q {q.shape} and k {k.shape} disagree in head_dim or num_heads % num_kv_heads")
  if is_landmark.shape != q.shape[:2]:
    raise ValueError(f"is_landmark must be (batch, seq) = {q.shape[:2]}; got {tuple(is_landmark.shape)}")


def landmark_logits(q: jax.Array, k: jax.Array, scale: float | None = None) -> jax.Array:
  """(batch, heads, q_len, kv_len) float32 logits ``scale · q·k`` with kv heads shared by query-head groups."""
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
  return jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale


def landmark_attention(q: jax.Array, k: jax.Array, v: jax.Array, is_landmark: jax.Array, *,
                       scale: float | None = None, segment_ids: jax.Array | None = None,
                       return_weights: bool = False):
  """Training-mode landmark attention over a whole sequence (any landmark layout).

  Args:
    q: (batch, seq, num_heads, head_dim); k, v: (batch, seq, num_kv_heads, head_dim) (GQA allowed), RoPE applied.
    is_landmark: (batch, seq) bool.
    scale: logit scale, default ``1/sqrt(head_dim)``.
    segment_ids: optional (batch, seq) packing ids; a query sees keys (and landmark gates) of its own segment
      only, and a past block contributes only if its landmark is visible.
    return_weights: also return the dense weights (batch, num_heads, seq, seq).

  Returns:
    (batch, seq, num_heads, head_dim) in ``q.dtype`` (and the weights when asked).
  """
  _check_qkv(q, k, v, is_landmark)
  n = q.shape[1]
  s = landmark_logits(q, k, scale)
  visible = None if segment_ids is None else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  w = grouped_softmax_weights(s, is_landmark, jnp.arange(n), visible)
  v = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)
  o = jnp.einsum("bhqk,bkhd->bqhd", w, v.astype(jnp.float32)).astype(q.dtype)
  return (o, w) if return_weights else o

"""The dense attention reference: input checks, the helpers every backend shares, and dense (n x n) attention.

Every backend (the Pallas kernels, the blocked path) and every variant checks its inputs with
:func:`check_inputs` and splits segment ids with :func:`split_segment_ids`; the score contract
(:mod:`attnlab.ops.scores`) prepares q/k and resolves the scale. :func:`dense_attention` is what the other
backends are tested against.

Layout follows ``jax.nn.dot_product_attention``: q ``(batch, q_len, num_heads, head_dim)``, k/v
``(batch, kv_len, num_kv_heads, head_dim)``; grouped-query attention when ``num_heads % num_kv_heads == 0``
(query head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``). Logits are
``s_ij = scale * q_i.k_j + bias_ij`` with ``scale = 1/sqrt(head_dim)`` by default, computed in float32;
the score function maps them to weights ``p_ij`` and ``o_i = sum_j p_ij v_j``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attnlab.ops.masks import causal_mask, combine_masks, segment_mask
from attnlab.ops.scores import ScoreContext, get_score


def check_inputs(q, k, v) -> None:
  """Rank, batch, head_dim and grouped-query agreement of q (B, Q, H, D) and k, v (B, K, Hkv, D); ValueError."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 (batch, seq, heads, head_dim); got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a floating-point array; got dtype {x.dtype}")
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(f"k and v must agree in (batch, kv_len, num_kv_heads); got k {k.shape}, v {v.shape}")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"head_dim mismatch: q has {q.shape[3]}, k has {k.shape[3]}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(
        f"num_heads ({q.shape[2]}) must be a multiple of num_kv_heads ({k.shape[2]}) for grouped-query attention")


def split_segment_ids(segment_ids: Any, batch: int, q_len: int, kv_len: int):
  """``segment_ids`` ((batch, seq) ids, or a ``(q_ids, kv_ids)`` pair) as a checked (q_ids, kv_ids) pair of
  shapes (batch, q_len) and (batch, kv_len); (None, None) when there are none."""
  if segment_ids is None:
    return None, None
  q_seg, kv_seg = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
  if q_seg.shape != (batch, q_len) or kv_seg.shape != (batch, kv_len):
    raise ValueError(f"segment_ids must be (batch, q_len)={(batch, q_len)} and (batch, kv_len)={(batch, kv_len)}; "
                     f"got {tuple(q_seg.shape)} and {tuple(kv_seg.shape)} (pass a (q, kv) pair when lengths differ)")
  return q_seg, kv_seg


def _per_head(x: jax.Array | None, name: str, batch: int, heads: int, kv_heads: int, q_len: int, kv_len: int):
  """Broadcasts a (B|1, H|1, Q|1, K|1) array (or lower rank, numpy-style) and splits heads into (Hkv, G)."""
  if x is None:
    return None
  if x.ndim > 4:
    raise ValueError(f"{name} must broadcast to (batch, num_heads, q_len, kv_len); got shape {tuple(x.shape)}")
  x = x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))
  for got, want, axis in zip(x.shape, (batch, heads, q_len, kv_len), ("batch", "num_heads", "q_len", "kv_len")):
    if got not in (1, want):
      raise ValueError(f"{name} shape {tuple(x.shape)} does not broadcast to (batch, num_heads, q_len, kv_len) = "
                       f"{(batch, heads, q_len, kv_len)}: {axis} is {got}")
  if x.shape[1] == 1:
    return x[:, :, None]
  return x.reshape(x.shape[0], kv_heads, heads // kv_heads, x.shape[2], x.shape[3])


def _weights_grouped(q, k, *, score, causal, scale, bias, mask, segment_ids, sink_logits, score_params):
  """Weights in the grouped layout (batch, kv_heads, group, q_len, kv_len), float32."""
  check_inputs(q, k, k)
  fn = get_score(score)
  fn.check_params(score_params)
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  ctx = ScoreContext(q_len=q_len, kv_len=kv_len, head_dim=head_dim)
  q, k, scale = fn.prepare_inputs(q, k, scale, ctx, score_params)

  qg = q.astype(jnp.float32).reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) * scale
  if bias is not None:
    s = s + _per_head(jnp.asarray(bias, jnp.float32), "bias", batch, heads, kv_heads, q_len, kv_len)

  masks = [jnp.ones((1, 1, 1, q_len, kv_len), bool)]
  if causal:
    masks.append(causal_mask(q_len, kv_len)[None, None, None])
  q_seg, kv_seg = split_segment_ids(segment_ids, batch, q_len, kv_len)
  if q_seg is not None:
    masks.append(segment_mask(q_seg, kv_seg)[:, None, None])
  if mask is not None:
    masks.append(_per_head(jnp.asarray(mask, bool), "mask", batch, heads, kv_heads, q_len, kv_len))
  full_mask = combine_masks(*masks)

  sinks = fn.check_sink_logits(sink_logits, heads)
  if sinks is not None:
    sinks = sinks.reshape(1, kv_heads, heads // kv_heads, 1, 1)
  return fn.weights(s, full_mask, sink_logits=sinks, ctx=ctx, **score_params)


def attention_weights(q: jax.Array, k: jax.Array, *, score: str = "softmax", causal: bool = True,
                      scale: float | None = None, bias: jax.Array | None = None, mask: jax.Array | None = None,
                      segment_ids: Any = None, sink_logits: jax.Array | None = None,
                      **score_params) -> jax.Array:
  """Dense attention weights ``p`` of shape (batch, num_heads, q_len, kv_len), float32 (for analysis)."""
  w = _weights_grouped(q, k, score=score, causal=causal, scale=scale, bias=bias, mask=mask,
                       segment_ids=segment_ids, sink_logits=sink_logits, score_params=score_params)
  return w.reshape(w.shape[0], -1, w.shape[3], w.shape[4])


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, score: str = "softmax", causal: bool = True,
                    scale: float | None = None, bias: jax.Array | None = None, mask: jax.Array | None = None,
                    segment_ids: Any = None, sink_logits: jax.Array | None = None, **score_params) -> jax.Array:
  """``o_i = sum_j p_ij v_j`` from the full (q_len, kv_len) weights; same arguments as :func:`attnlab.attend`."""
  check_inputs(q, k, v)
  w = _weights_grouped(q, k, score=score, causal=causal, scale=scale, bias=bias, mask=mask,
                       segment_ids=segment_ids, sink_logits=sink_logits, score_params=score_params)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", w, v.astype(jnp.float32))
  return out.reshape(q.shape[:3] + (v.shape[-1],)).astype(q.dtype)

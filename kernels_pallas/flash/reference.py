"""Pure-jnp reference of the flash op: the output is the dense path (:func:`attnlab.ops.dense.dense_attention`);
the residual ``r`` is
the same row statistic the kernels keep, computed over the whole (dense) row with the score's hooks.

Materialises (batch, heads, q_len, kv_len): for tests and small shapes only.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.ops.dense import dense_attention, visibility
from attnlab.ops.scores import ScoreContext, get_score
from kernels_pallas.flash.common import MASK_VALUE


def flash_reference(q, k, v, *, score: str = "softmax", causal: bool = True, scale: float | None = None,
                    window: int | None = None, segment_ids: Any = None, sink_logits: jax.Array | None = None,
                    return_residuals: bool = False,
                    **score_params):
  """Same contract as :func:`kernels_pallas.flash.flash_attention` (o, and r of shape (batch, heads, q_len))."""
  o = dense_attention(q, k, v, score=score, causal=causal, window=window, scale=scale, segment_ids=segment_ids,
                      sink_logits=sink_logits, **score_params)
  if not return_residuals:
    return o
  fn = get_score(score)
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  ctx = ScoreContext(q_len=q_len, kv_len=kv_len, head_dim=head_dim)
  hooks = fn.blockwise(ctx, **score_params)
  q, k, scale = fn.prepare_inputs(q, k, scale, ctx, score_params)
  k = jnp.repeat(k, heads // k.shape[2], axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  mask = visibility(batch, heads, q_len, kv_len, causal=causal, window=window, segment_ids=segment_ids)
  n = jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.float32)
  m = jnp.zeros(s.shape[:3] + (1,), jnp.float32)
  l = jnp.zeros_like(m)
  if hooks.online:
    sinks = None if sink_logits is None else jnp.asarray(sink_logits, jnp.float32)[None, :, None, None]
    m0 = MASK_VALUE if sinks is None and hooks.init_shift == -math.inf else hooks.init_shift
    m = jnp.maximum(m + (m0 if sinks is None else sinks), jnp.max(jnp.where(mask, s, MASK_VALUE), -1, keepdims=True))
    if sinks is not None:
      l = hooks.block(sinks + 0 * m, m, n)[1]
  _, d = hooks.block(jnp.where(mask, s, 0.0), m, n)
  if hooks.uses_sum:
    l = l + jnp.sum(jnp.where(mask, d, 0.0), -1, keepdims=True)
  denom = hooks.denominator(l, m, n)
  return o, (m + jnp.log(jnp.where(denom > 0, denom, 1.0)))[..., 0]

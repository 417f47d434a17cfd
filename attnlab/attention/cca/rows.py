"""One fused CCA attention row: a single score function over [visible core tokens ; visible raw tokens]."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from attnlab.ops.scores import ScoreContext, ScoreFunction


def prepare_inputs(fn: ScoreFunction, q, k, core_k, scale, ctx: ScoreContext, params: dict[str, Any]):
  """Applies the score function's q/k transform (e.g. softplus' l2-normalisation) to q, raw keys and core keys.

  Pooling always uses the raw (rotated) q/k; the transform belongs to the attention row, so core keys are
  transformed after pooling. Returns float32 (q, k, core_k, scale) with the scale resolved.
  """
  q, k, core_k = (x.astype(jnp.float32) for x in (q, k, core_k))
  _, core_k, _ = fn.prepare_inputs(q, core_k, scale, ctx, params)
  q, k, scale = fn.prepare_inputs(q, k, scale, ctx, params)
  return q, k, core_k, scale


def attend_rows(qg, core_k, core_v, k, v, mask_core, mask_raw, *, fn: ScoreFunction, scale: float, sinks,
                ctx: ScoreContext, params: dict[str, Any]):
  """o_t = sum_p a_tp v^c_p + sum_j a_tj v_j with a_t = score([s^c_t ; s_t]) (one normalisation per row).

  Args:
    qg: (B, Q, Hkv, G, d) queries. core_k/core_v: (B, C, Hkv, G, d). k/v: (B, W, Hkv, d) raw keys/values.
    mask_core: bool broadcastable to (B, Hkv, G, Q, C). mask_raw: bool broadcastable to (B, Hkv, G, Q, W).
    sinks: None or (1, Hkv, G, 1, 1) sink logits.

  Returns:
    (o (B, Q, Hkv, G, d) float32, core weights (B, Hkv, G, Q, C), raw weights (B, Hkv, G, Q, W)).
  """
  nc = core_k.shape[1]
  s_core = jnp.einsum("bqhgd,bchgd->bhgqc", qg, core_k) * scale
  s_raw = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k) * scale
  logits = jnp.concatenate([s_core, s_raw], axis=-1)
  shape = logits.shape[:-1]
  mask = jnp.concatenate([jnp.broadcast_to(mask_core, shape + (nc,)),
                          jnp.broadcast_to(mask_raw, shape + (k.shape[1],))], axis=-1)
  w = fn.weights(logits, mask, sink_logits=sinks, ctx=ctx, **params)
  w_core, w_raw = w[..., :nc], w[..., nc:]
  o = (jnp.einsum("bhgqc,bchgd->bqhgd", w_core, core_v.astype(jnp.float32))
       + jnp.einsum("bhgqk,bkhd->bqhgd", w_raw, v.astype(jnp.float32)))
  return o, w_core, w_raw


def grouped_sinks(sink_logits, num_heads: int, kv_heads: int):
  """(H,) sink logits -> (1, Hkv, G, 1, 1) float32, or None."""
  if sink_logits is None:
    return None
  sink_logits = jnp.asarray(sink_logits, jnp.float32)
  if sink_logits.shape != (num_heads,):
    raise ValueError(f"sink_logits must have shape (num_heads,) = ({num_heads},); got {tuple(sink_logits.shape)}")
  return sink_logits.reshape(1, kv_heads, num_heads // kv_heads, 1, 1)

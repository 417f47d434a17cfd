"""Boolean attention masks (True = the query may attend to the key), shared by every attention path."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_mask(q_len: int, kv_len: int) -> jax.Array:
  """(q_len, kv_len) causal mask with queries aligned to the END of the keys (decode with a cache):
  query i sits at absolute position ``i + kv_len - q_len`` and sees keys ``j <= i + kv_len - q_len``."""
  offset = kv_len - q_len
  return jnp.arange(kv_len)[None, :] <= (jnp.arange(q_len)[:, None] + offset)


def check_window(window) -> int | None:
  """``window`` as a positive int (or None); ValueError otherwise."""
  if window is None:
    return None
  if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
    raise ValueError(f"window must be a positive int (the number of keys a query sees, itself included) or None; "
                     f"got {window!r}")
  return window


def position_mask(q_len: int, kv_len: int, *, causal: bool, window: int | None = None) -> jax.Array | None:
  """(q_len, kv_len) causal AND sliding-window mask, end-aligned (query i sits at ``p = i + kv_len - q_len``), or
  None when neither applies. A window W keeps keys ``p - W < j <= p`` (the query itself and the W - 1 before it:
  Mistral / Gemma / gpt-oss local layers; StreamingLLM's window baseline); it implies the causal upper bound."""
  if not causal and window is None:
    return None
  p = jnp.arange(q_len)[:, None] + (kv_len - q_len)
  j = jnp.arange(kv_len)[None, :]
  mask = j <= p
  if window is not None:
    mask = jnp.logical_and(mask, j > p - window)
  return mask


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
  """(batch, q_len, kv_len) mask: a query sees only keys of its own segment (packed sequences)."""
  return q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
  """Logical AND of the given (broadcastable) masks; ``None`` entries are ignored."""
  out = None
  for m in masks:
    if m is not None:
      out = m if out is None else jnp.logical_and(out, m)
  return out


def self_attention_mask(seq: int, segment_ids: jax.Array | None, *, causal: bool = True) -> jax.Array:
  """(batch|1, 1, seq, seq) causal (if ``causal``) AND same-segment mask of self-attention."""
  mask = causal_mask(seq, seq)[None, None] if causal else jnp.ones((1, 1, seq, seq), bool)
  if segment_ids is not None:
    mask = jnp.logical_and(mask, segment_mask(segment_ids, segment_ids)[:, None])
  return mask

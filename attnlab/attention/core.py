"""The functional attention core: ``attend`` and ``attention_weights``.

Every attention variant, kernel and analysis tool in attnlab is measured against these two functions.

Layout follows ``jax.nn.dot_product_attention``: q ``(batch, q_len, num_heads, head_dim)``, k/v
``(batch, kv_len, num_kv_heads, head_dim)``; grouped-query attention when ``num_heads % num_kv_heads == 0``
(query head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``). Logits are
``s_ij = scale * q_i.k_j + bias_ij`` with ``scale = 1/sqrt(head_dim)`` by default, computed in float32;
the score function (registered by name, see :mod:`attnlab.attention.scores`) maps them to weights ``p_ij`` and
``o_i = sum_j p_ij v_j``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.attention.masks import causal_mask, combine_masks, segment_mask
from attnlab.attention.scores import ScoreContext, get_score


def _check_inputs(q, k, v) -> None:
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 (batch, seq, heads, head_dim); got shape {tuple(x.shape)}")
  if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[:3] != v.shape[:3]:
    raise ValueError(f"k and v must agree in (batch, kv_len, num_kv_heads); got k {k.shape}, v {v.shape}")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"head_dim mismatch: q has {q.shape[3]}, k has {k.shape[3]}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(
        f"num_heads ({q.shape[2]}) must be a multiple of num_kv_heads ({k.shape[2]}) for grouped-query attention")


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
  _check_inputs(q, k, k)
  fn = get_score(score)
  fn.check_params(score_params)
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  ctx = ScoreContext(q_len=q_len, kv_len=kv_len, head_dim=head_dim)
  if fn.prepare is not None:
    q, k, scale = fn.prepare(q, k, scale, ctx, **score_params)
  if scale is None:
    scale = 1.0 / math.sqrt(head_dim)

  qg = q.astype(jnp.float32).reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) * scale
  if bias is not None:
    s = s + _per_head(jnp.asarray(bias, jnp.float32), "bias", batch, heads, kv_heads, q_len, kv_len)

  full = jnp.ones((1, 1, 1, q_len, kv_len), bool)
  masks = [full]
  if causal:
    masks.append(causal_mask(q_len, kv_len)[None, None, None])
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
    if q_seg.shape != (batch, q_len) or kv_seg.shape != (batch, kv_len):
      raise ValueError(f"segment_ids must be (batch, q_len)={(batch, q_len)} and (batch, kv_len)={(batch, kv_len)}; "
                       f"got {tuple(q_seg.shape)} and {tuple(kv_seg.shape)} (pass a (q, kv) pair when lengths differ)")
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


IMPLS = ("xla", "pallas", "auto")


def kernel_unsupported(q, k, v, *, score: str, bias, mask, score_params: dict) -> str | None:
  """Why the Pallas flash kernel cannot run this call (None if it can)."""
  if bias is not None or mask is not None:
    return "a dense bias/mask (the kernel builds causal and segment masks itself)"
  fn = get_score(score)
  if fn.blockwise is None:
    return f"score function {score!r} has no flash-kernel hooks"
  if v.shape[-1] != q.shape[-1]:
    return "v head_dim != q head_dim"
  try:
    fn.blockwise(ScoreContext(q_len=q.shape[1], kv_len=k.shape[1], head_dim=q.shape[3]), **score_params)
  except (ValueError, TypeError) as e:
    return str(e)
  return None


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, score: str = "softmax", causal: bool = True,
           scale: float | None = None, bias: jax.Array | None = None, mask: jax.Array | None = None,
           segment_ids: Any = None, sink_logits: jax.Array | None = None, impl: str = "xla",
           **score_params) -> jax.Array:
  """Attention ``o_i = sum_j p_ij v_j`` with ``p = score(scale * q k^T + bias)`` over visible keys.

  Args:
    q: (batch, q_len, num_heads, head_dim). k, v: (batch, kv_len, num_kv_heads, head_dim).
    score: registered score-function name ("softmax", "sigmoid", "softplus", "softpick", "relu", ...).
    causal: causal mask with queries aligned to the end of the keys when ``q_len < kv_len``.
    scale: logit scale; default ``1/sqrt(head_dim)`` (softplus defaults to ``log(head_dim)``).
    bias: additive logit bias broadcastable to (batch, num_heads, q_len, kv_len).
    mask: boolean mask broadcastable to (batch, num_heads, q_len, kv_len); True = may attend. ANDed with the
      causal and segment masks. Masked entries get weight exactly 0 for every score function.
    segment_ids: (batch, seq) int ids when ``q_len == kv_len``, or a ``(q_ids, kv_ids)`` pair; tokens attend
      only within their segment (packing).
    sink_logits: (num_heads,) per-head sink logit (softmax only): adds ``exp(sink_h)`` to the denominator.
    impl: "xla" (dense, this module), "pallas" (the flash kernel of :mod:`kernels_pallas.flash`; a ValueError
      if the call needs something it lacks, e.g. a dense ``mask``/``bias``), or "auto" (the kernel on GPU/TPU
      when it supports the call, XLA otherwise and on CPU).
    **score_params: parameters of the score function (e.g. ``b``/``normalize`` for sigmoid).

  Returns:
    (batch, q_len, num_heads, head_dim) in ``q.dtype``; a query with no visible key returns 0.
  """
  _check_inputs(q, k, v)
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
  if impl != "xla":
    get_score(score).check_params(score_params)
    reason = kernel_unsupported(q, k, v, score=score, bias=bias, mask=mask, score_params=score_params)
    if impl == "pallas" and reason is not None:
      raise ValueError(f"impl='pallas' cannot run this call: {reason}; use impl='xla' or 'auto'")
    if impl == "pallas" or (reason is None and jax.default_backend() in ("gpu", "tpu")):
      from kernels_pallas.flash import flash_attention  # noqa: PLC0415  (kernels depend on this module)
      return flash_attention(q, k, v, score=score, causal=causal, scale=scale, segment_ids=segment_ids,
                             sink_logits=sink_logits, **score_params)
  w = _weights_grouped(q, k, score=score, causal=causal, scale=scale, bias=bias, mask=mask,
                       segment_ids=segment_ids, sink_logits=sink_logits, score_params=score_params)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", w, v.astype(jnp.float32))
  return out.reshape(q.shape[:3] + (v.shape[-1],)).astype(q.dtype)

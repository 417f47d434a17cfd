"""``flash_attention``: the public entry point (argument checks, dispatch to the GPU/TPU kernel, custom_vjp)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.ops.dense import check_inputs, split_segment_ids
from attnlab.ops.masks import check_window
from attnlab.ops.scores import ScoreContext, get_score
from kernels_pallas.flash import gpu, tpu
from kernels_pallas.flash.common import FlashStatic, visible_counts
from kernels_pallas.flash.config import BACKENDS, BlockSizes

_KERNELS = {"gpu": gpu, "tpu": tpu}


def default_backend() -> str:
  """"tpu" on TPU, "gpu" otherwise (on CPU the GPU-style kernel runs in interpret mode)."""
  return "tpu" if jax.default_backend() == "tpu" else "gpu"


def kernel_segment_ids(segment_ids: Any, batch: int, q_len: int, kv_len: int):
  """(q_ids (B, Q, 1), kv_ids (B, 1, K)) int32 column/row layout for the kernels, or (None, None)."""
  q_seg, kv_seg = split_segment_ids(segment_ids, batch, q_len, kv_len)
  if q_seg is None:
    return None, None
  return q_seg.astype(jnp.int32)[:, :, None], kv_seg.astype(jnp.int32)[:, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(st: FlashStatic, backend: str, q, k, v, sinks, q_seg, kv_seg, count):
  return _KERNELS[backend].forward(st, q, k, v, q_seg, kv_seg, count, sinks)


def _flash_fwd(st, backend, q, k, v, sinks, q_seg, kv_seg, count):
  o, r = _KERNELS[backend].forward(st, q, k, v, q_seg, kv_seg, count, sinks)
  return (o, r), (q, k, v, sinks, q_seg, kv_seg, count, o, r)


def _flash_bwd(st, backend, res, cotangents):
  q, k, v, sinks, q_seg, kv_seg, count, o, r = res
  do, dr = cotangents
  # delta_i = sum_j p_ij dp_ij = do_i . o_i; a cotangent on r_i enters every score's ds as -dr_i here.
  delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))[..., None] - dr
  dq, dk, dv = _KERNELS[backend].backward(st, q, k, v, q_seg, kv_seg, count, o, r, do, delta)
  batch, kv_len, kv_heads, head_dim = k.shape
  dk = dk.reshape(batch, kv_len, kv_heads, st.groups, head_dim).sum(3).astype(k.dtype)
  dv = dv.reshape(batch, kv_len, kv_heads, st.groups, v.shape[-1]).sum(3).astype(v.dtype)
  dsinks = None
  if sinks is not None:  # the sink is a key with value 0: d sink_h = -sum_{b,i} p_sink * delta
    dsinks = -jnp.sum(jnp.exp(sinks[None, :, :, 0] - r[..., 0]) * delta[..., 0], axis=(0, 2))[:, None, None]
  return dq, dk, dv, dsinks, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_unsupported(q, k, v, *, score: str, bias=None, mask=None, score_params: dict, backend: str | None = None,
                      interpret: bool | None = None, block_sizes: BlockSizes | None = None, window=None,
                      **_) -> str | None:
  """Why :func:`flash_attention` cannot run this call (None if it can), with the block sizes it would resolve
  for these shapes on ``backend`` (default: this platform's) -- the same resolution the kernel applies, so a call
  this accepts never raises in the kernel (decode steps q_len 1, kv_len 200, head_dim 8 on real GPUs: declined)."""
  try:
    check_window(window)
  except ValueError as e:
    return str(e)
  if bias is not None or mask is not None:
    return "a dense bias/mask (the kernel builds causal and segment masks itself)"
  fn = get_score(score)
  if fn.blockwise is None:
    return f"score function {score!r} has no flash-kernel hooks"
  if v.shape[-1] != q.shape[-1]:
    return "v head_dim != q head_dim"
  backend = default_backend() if backend is None else backend
  interpret = jax.default_backend() == "cpu" if interpret is None else interpret
  try:
    fn.blockwise(ScoreContext(q_len=q.shape[1], kv_len=k.shape[1], head_dim=q.shape[3]), **score_params)
    (block_sizes or BlockSizes()).resolve(q.shape[1], k.shape[1], q.shape[3], backend, interpret)
  except (ValueError, TypeError) as e:
    return str(e)
  return None


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, score: str = "softmax", causal: bool = True,
                    scale: float | None = None, window: int | None = None, segment_ids: Any = None,
                    sink_logits: jax.Array | None = None, block_sizes: BlockSizes | None = None, backend: str | None = None,
                    interpret: bool | None = None, return_residuals: bool = False, **score_params):
  """Flash attention with a pluggable score function; same semantics as :func:`attnlab.attend`.

  Args:
    q: (batch, q_len, num_heads, head_dim); k, v: (batch, kv_len, num_kv_heads, head_dim) (GQA when fewer).
    score: a registered score function with flash hooks (softmax, sigmoid, softpick, relu, softplus w/o reweight).
    causal: causal mask, queries aligned to the end of the keys when q_len < kv_len.
    window: sliding window W: the query at position p sees keys p - W < j <= p (tiles outside the band are
      skipped: O(n W) work).
    scale: logit scale (default 1/sqrt(head_dim); softplus: log(head_dim) after l2-normalising q and k).
    segment_ids: (batch, seq) ids or a (q_ids, kv_ids) pair; attention stays within a segment.
    sink_logits: (num_heads,) per-head sink logits (softmax).
    block_sizes: tile sizes (:class:`BlockSizes`); default 128 x 128 clamped to the sequence.
    backend: "gpu" (Triton-style kernel) or "tpu" (Mosaic-style kernel); default from ``jax.default_backend()``.
    interpret: run the kernel in Pallas interpret mode (default: True on CPU). The TPU kernel interprets under the
      TPU simulator (``pltpu.InterpretParams``).
    return_residuals: also return ``r`` (batch, num_heads, q_len): ``r_i = m_i + log D_i``, the row
      log-sum-exp for softmax (sink mass = exp(sink_h - r_i)), log row-sum for l1-normalised scores.
    **score_params: parameters of the score function.

  Returns:
    o (batch, q_len, num_heads, head_dim) in q.dtype, and r if ``return_residuals``.
  """
  check_inputs(q, k, v)
  window = check_window(window)
  if v.shape[-1] != q.shape[-1]:
    raise ValueError(f"the flash kernel needs v's head_dim == q's; got {v.shape[-1]} and {q.shape[-1]}")
  fn = get_score(score)
  fn.check_params(score_params)
  if fn.blockwise is None:
    raise ValueError(f"score function {score!r} has no flash-kernel hooks (Blockwise); use impl='xla'")
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  ctx = ScoreContext(q_len=q_len, kv_len=kv_len, head_dim=head_dim)
  hooks = fn.blockwise(ctx, **score_params)
  q, k, scale = fn.prepare_inputs(q, k, scale, ctx, score_params)
  scale = float(scale)

  backend = default_backend() if backend is None else backend
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
  interpret = jax.default_backend() == "cpu" if interpret is None else bool(interpret)
  blocks = (block_sizes or BlockSizes()).resolve(q_len, kv_len, head_dim, backend, interpret)

  sinks = fn.check_sink_logits(sink_logits, heads)
  if sinks is not None:
    sinks = sinks[:, None, None]
  q_seg, kv_seg = kernel_segment_ids(segment_ids, batch, q_len, kv_len)
  st = FlashStatic(score=hooks, causal=bool(causal), scale=scale, blocks=blocks, q_len=q_len, kv_len=kv_len,
                   groups=heads // kv_heads, has_segments=q_seg is not None, has_sinks=sinks is not None,
                   interpret=interpret, window=window)
  count = None
  if hooks.needs_count:
    count = visible_counts(st, q_seg, kv_seg, batch=batch, q_len=q_len, kv_len=kv_len, block_kv=blocks.block_kv)
  o, r = _flash(st, backend, q, k, v, sinks, q_seg, kv_seg, count)
  return (o, r[..., 0]) if return_residuals else o

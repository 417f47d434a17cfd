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

import functools
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.ops.masks import check_window, combine_masks, position_mask, segment_mask
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


def _broadcastable(x: jax.Array | None, name: str, batch: int, heads: int, q_len: int, kv_len: int):
  """A (B|1, H|1, Q|1, K|1) array (or lower rank, numpy-style) as rank 4, checked; never broadcast in memory."""
  if x is None:
    return None
  if x.ndim > 4:
    raise ValueError(f"{name} must broadcast to (batch, num_heads, q_len, kv_len); got shape {tuple(x.shape)}")
  x = x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))
  for got, want, axis in zip(x.shape, (batch, heads, q_len, kv_len), ("batch", "num_heads", "q_len", "kv_len")):
    if got not in (1, want):
      raise ValueError(f"{name} shape {tuple(x.shape)} does not broadcast to (batch, num_heads, q_len, kv_len) = "
                       f"{(batch, heads, q_len, kv_len)}: {axis} is {got}")
  return x


def visibility(batch: int, heads: int, q_len: int, kv_len: int, *, causal: bool, window: int | None = None,
               segment_ids: Any = None, mask: Any = None) -> jax.Array:
  """The one boolean mask of a call, rank 4 and only as broad as its parts ((1, 1, 1, K) when nothing is masked,
  (1, 1, Q, K) for causal/window, (B, 1, Q, K) with segments, ...): causal AND window AND segment AND ``mask``."""
  window = check_window(window)
  full = jnp.ones((1, 1, 1, kv_len), bool)  # keeps the key axis (visible-key counts sum over it)
  pos = position_mask(q_len, kv_len, causal=causal, window=window)
  q_seg, kv_seg = split_segment_ids(segment_ids, batch, q_len, kv_len)
  user = None if mask is None else _broadcastable(jnp.asarray(mask, bool), "mask", batch, heads, q_len, kv_len)
  return combine_masks(full, None if pos is None else pos[None, None],
                       None if q_seg is None else segment_mask(q_seg, kv_seg)[:, None], user)


def _weights(q, k, *, score, causal, window, scale, bias, mask, segment_ids, sink_logits, score_params):
  """Weights (batch, num_heads, q_len, kv_len), float32.

  GQA without copies: the G query heads of a kv head are stacked as G * q_len rows of one matrix (an O(n d)
  transpose of q), so the logits are one batched matmul over (batch, kv_heads) whose result *is* the
  (batch, heads, q_len, kv_len) layout (a free reshape); the scale multiplies q (O(n d)), not the n x n logits.
  """
  check_inputs(q, k, k)
  fn = get_score(score)
  fn.check_params(score_params)
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  ctx = ScoreContext(q_len=q_len, kv_len=kv_len, head_dim=head_dim)
  q, k, scale = fn.prepare_inputs(q, k, scale, ctx, score_params)
  qg = (q.astype(jnp.float32) * scale).reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
  qg = qg.transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, -1, head_dim)
  s = jnp.einsum("bhmd,bkhd->bhmk", qg, k.astype(jnp.float32)).reshape(batch, heads, q_len, kv_len)
  if bias is not None:
    s = s + _broadcastable(jnp.asarray(bias, jnp.float32), "bias", batch, heads, q_len, kv_len)
  visible = visibility(batch, heads, q_len, kv_len, causal=causal, window=window, segment_ids=segment_ids, mask=mask)
  sinks = fn.check_sink_logits(sink_logits, heads)
  if sinks is not None:
    sinks = sinks.reshape(1, heads, 1, 1)
  return fn.weights(s, visible, sink_logits=sinks, ctx=ctx, **score_params)


def attention_weights(q: jax.Array, k: jax.Array, *, score: str = "softmax", causal: bool = True,
                      window: int | None = None, scale: float | None = None, bias: jax.Array | None = None,
                      mask: jax.Array | None = None, segment_ids: Any = None, sink_logits: jax.Array | None = None,
                      **score_params) -> jax.Array:
  """Dense attention weights ``p`` of shape (batch, num_heads, q_len, kv_len), float32 (for analysis)."""
  w = _weights(q, k, score=score, causal=causal, window=window, scale=scale, bias=bias, mask=mask,
               segment_ids=segment_ids, sink_logits=sink_logits, score_params=score_params)
  return jnp.broadcast_to(w, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))


# On CPU the dense path runs the batch in chunks of at least MIN_CPU_CHUNK sequences, more while the chunk's float32
# logits (sequences x heads x q_len x kv_len) fit in CPU_CHUNK_LOGIT_BYTES. Measured with
# benchmarks/dense_chunks_cpu.py (fwd+bwd; --heads 4 and 8, --shapes from 4x512 to 64x128): 2-4 sequences per chunk
# were fastest in every shape (1.1-2x the whole batch at once), one sequence per step was slower than two in all
# of them (the default shapes: benchmarks/results/dense_chunks_cpu.json).
CPU_CHUNK_LOGIT_BYTES = 2 ** 20
MIN_CPU_CHUNK = 2


def cpu_batch_chunk(batch: int, heads: int, q_len: int, kv_len: int) -> int | None:
  """The ``batch_chunk`` of :func:`dense_attention` on CPU: the largest divisor of ``batch`` that is at most
  ``max(MIN_CPU_CHUNK, CPU_CHUNK_LOGIT_BYTES // logit bytes per sequence)``; None when that is 1 or the whole
  batch (nothing to gain)."""
  most = max(MIN_CPU_CHUNK, CPU_CHUNK_LOGIT_BYTES // (4 * heads * q_len * kv_len))
  chunk = max(c for c in range(1, min(most, batch) + 1) if batch % c == 0)
  return None if chunk in (1, batch) else chunk


def _map_batch_chunks(run, chunk: int, q, k, v, *, bias, mask, segment_ids):
  """``run(q, k, v, bias=, mask=, segment_ids=)`` over chunks of ``chunk`` sequences, one ``lax.map`` step each,
  rematerialised in the backward pass. A bias or mask with batch size 1 is shared by every chunk."""
  batch, q_len, heads, _ = q.shape
  kv_len = k.shape[1]
  if not isinstance(chunk, int) or chunk < 1 or batch % chunk:
    raise ValueError(f"batch_chunk must be a positive divisor of the batch ({batch}); got {chunk!r}")
  bias = _broadcastable(None if bias is None else jnp.asarray(bias, jnp.float32), "bias", batch, heads, q_len,
                        kv_len)
  mask = _broadcastable(None if mask is None else jnp.asarray(mask, bool), "mask", batch, heads, q_len, kv_len)
  q_seg, kv_seg = split_segment_ids(segment_ids, batch, q_len, kv_len)
  per_chunk = {"q": q, "k": k, "v": v, "segment_ids": None if q_seg is None else (q_seg, kv_seg)}
  shared = {}
  for name, x in (("bias", bias), ("mask", mask)):
    (per_chunk if x is not None and x.shape[0] == batch else shared)[name] = x
  split = lambda x: x.reshape(batch // chunk, chunk, *x.shape[1:])

  @jax.checkpoint
  def one_chunk(xs):
    xs = {**shared, **xs}
    return run(xs["q"], xs["k"], xs["v"], bias=xs["bias"], mask=xs["mask"], segment_ids=xs["segment_ids"])

  out = jax.lax.map(one_chunk, jax.tree.map(split, per_chunk))
  return out.reshape(batch, *out.shape[2:])


# Causal softmax calls with at least this many queries run as two query halves, the first against only the keys it
# can see: a quarter of the n x n logits, weights and their gradients is never formed. Measured on CPU with
# benchmarks/train_throughput.py (seq 256: the step ~4 % faster); the blocked path takes over at longer lengths.
CAUSAL_SPLIT_MIN_LEN = 256


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, score: str = "softmax", causal: bool = True,
                    window: int | None = None, scale: float | None = None, bias: jax.Array | None = None,
                    mask: jax.Array | None = None, segment_ids: Any = None, sink_logits: jax.Array | None = None,
                    batch_chunk: int | None = None, **score_params) -> jax.Array:
  """``o_i = sum_j p_ij v_j`` from the full (q_len, kv_len) weights; same arguments as :func:`attnlab.attend`.

  The float32 reference the blocked path and the kernels are checked against, and the fastest path for short
  sequences: one mask, applied once by the score function; (batch, heads, q, k) logits with no n x n transpose
  in the forward or backward pass (see :func:`_weights`). Causal softmax with ``q_len >= CAUSAL_SPLIT_MIN_LEN``
  and no bias or mask: queries ``[0, h)``, ``h = q_len // 2``, attend to keys ``[0, kv_len - q_len + h)`` only
  (end-aligned, the keys they can see; softmax weights are row-local, so the rows are unchanged), the rest to all
  keys.

  ``batch_chunk``: run that many sequences at a time (``lax.map``) and recompute each chunk's weights in the
  backward pass (``jax.checkpoint``) instead of storing them: a chunk's n x n logits, weights and gradients stay in
  cache, and the backward pass keeps no (batch, heads, q_len, kv_len) residual. It must divide the batch; None (the
  default) runs the whole batch at once. ``attend`` picks it on CPU with :func:`cpu_batch_chunk`.
  """
  check_inputs(q, k, v)
  q_len, kv_len = q.shape[1], k.shape[1]
  if batch_chunk is not None and batch_chunk != q.shape[0]:
    run = functools.partial(dense_attention, score=score, causal=causal, window=window, scale=scale,
                            sink_logits=sink_logits, **score_params)
    return _map_batch_chunks(run, batch_chunk, q, k, v, bias=bias, mask=mask, segment_ids=segment_ids)
  call = dict(score=score, causal=causal, window=window, scale=scale, bias=bias, mask=mask, sink_logits=sink_logits,
              **score_params)
  if not (causal and score == "softmax" and bias is None and mask is None and q_len >= CAUSAL_SPLIT_MIN_LEN):
    return _dense(q, k, v, segment_ids=segment_ids, **call)
  half = q_len // 2
  seen = kv_len - (q_len - half)  # the keys query half - 1 (end-aligned) can see
  q_seg, kv_seg = split_segment_ids(segment_ids, q.shape[0], q_len, kv_len)
  seg = lambda qs, n: None if q_seg is None else (q_seg[:, qs], kv_seg[:, :n])
  first = _dense(q[:, :half], k[:, :seen], v[:, :seen], segment_ids=seg(slice(None, half), seen), **call)
  rest = _dense(q[:, half:], k, v, segment_ids=seg(slice(half, None), kv_len), **call)
  return jnp.concatenate([first, rest], axis=1)


def _dense(q, k, v, *, score, causal, window, scale, bias, mask, segment_ids, sink_logits, **score_params):
  """:func:`dense_attention` over the full (q_len, kv_len) weights."""
  w = _weights(q, k, score=score, causal=causal, window=window, scale=scale, bias=bias, mask=mask,
               segment_ids=segment_ids, sink_logits=sink_logits, score_params=score_params)
  batch, q_len, heads, _ = q.shape
  kv_len, kv_heads, dv = v.shape[1], v.shape[2], v.shape[3]
  w = jnp.broadcast_to(w, (batch, heads, q_len, kv_len)).reshape(batch, kv_heads, -1, kv_len)
  out = jnp.einsum("bhmk,bkhd->bhmd", w, v.astype(jnp.float32))
  out = out.reshape(batch, kv_heads, heads // kv_heads, q_len, dv).transpose(0, 3, 1, 2, 4)
  return out.reshape(batch, q_len, heads, dv).astype(q.dtype)

"""Blocked (flash-style) attention in pure JAX: ``attend(..., impl="blocked")``.

    o_i = (sum_j u_ij v_j) / D_i  over the visible keys j of query i,  r_i = m_i + log D_i

computed one (block_q x block_kv) tile at a time with the score function's :class:`Blockwise` hooks -- the online
softmax of Milakov & Gimelshein ("Online normalizer calculation for softmax", arXiv 1805.02867) and FlashAttention
(Dao et al., arXiv 2205.14135; FlashAttention-2, Dao, arXiv 2307.08691) generalised to every score function with
hooks (FlashSigmoid: Ramapuram et al., arXiv 2409.04431). The tile math is :mod:`kernels_pallas.flash.common`, the
same functions the Pallas kernels call, so score functions, sink logits, GQA, segment ids, end-aligned decode
(q_len < kv_len, q_len 1 included), sliding windows and the residual ``r`` come from one body. An optional
per-query key range ``lo_i <= j < hi_i`` narrows any of these masks (e.g. the core and band rows of CCA, which
merge two calls by their residuals).

Schedule: a ``lax.scan`` over query blocks, inside it ``lax.fori_loop`` s over exactly the key blocks that can be
visible (causal: up to the diagonal; window W: from the band's lower edge), so fully masked tiles cost nothing,
and tiles entirely inside the band skip the mask.
The G query heads of one kv head are stacked as G * block_q rows of one matmul (GQA without repeating k/v). The
custom VJP keeps only (q, k, v, o, r) and recomputes each tile's weights from ``r`` in one backward sweep that
accumulates dq per query block and dk/dv in place (no n x n residual; temporaries O(n d + block_q block_kv)).
Lengths that are not multiples of the block sizes are padded internally (padded keys are masked, padded query rows
dropped).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.ops.dense import check_inputs, split_segment_ids
from attnlab.ops.masks import check_window
from attnlab.ops.scores import ScoreContext, get_score
from kernels_pallas.flash import common
from kernels_pallas.flash.common import FlashStatic
from kernels_pallas.flash.config import BlockSizes

# Default tiles: key blocks of a quarter of the key length rounded to a power of two within [128, 256], query blocks
# twice as tall (measured on CPU with benchmarks/blocked_cpu.py and block-size sweeps: 512 x 256 tiles beat square
# 256 or 512 ones by 10-30 % from 1k keys on; four or more key blocks let causal and window masks skip tiles).
MIN_BLOCK_KV, MAX_BLOCK_KV = 128, 256


def default_blocks(kv_len: int) -> tuple[int, int]:
  """The default (block_q, block_kv) for ``kv_len`` keys (clamped to each length by the caller)."""
  quarter = 1 << max(kv_len // 4, 1).bit_length() - 1
  block_kv = max(MIN_BLOCK_KV, min(MAX_BLOCK_KV, quarter))
  return 2 * block_kv, block_kv


def blocked_unsupported(q, k, v, *, score: str, bias=None, mask=None, score_params: dict, window=None,
                        **_) -> str | None:
  """Why :func:`blocked_attention` cannot run this call (None if it can)."""
  del v
  if bias is not None or mask is not None:
    return "a dense bias/mask (the blocked path builds causal, window and segment masks itself)"
  fn = get_score(score)
  if fn.blockwise is None:
    return f"score function {score!r} has no Blockwise hooks"
  try:
    check_window(window)
    fn.blockwise(ScoreContext(q_len=q.shape[1], kv_len=k.shape[1], head_dim=q.shape[3]), **score_params)
  except (ValueError, TypeError) as e:
    return str(e)
  return None


def _dot(a, b, spec):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _group_matmul(u, v):
  """(B, Hkv, G, bq, bk) @ (B, Hkv, bk, Dv) -> (B, Hkv, G, bq, Dv): the G heads of a kv head as one matmul."""
  b, h, g, bq, bk = u.shape
  out = _dot(u.reshape(b, h, g * bq, bk), v, "bhmk,bhkd->bhmd")
  return out.reshape(b, h, g, bq, v.shape[-1])


def _tile(st: FlashStatic, i, j, bq: int, bk: int, qm, kt, q_seg, kv_seg, key_range, masked: bool):
  """Logits (B, Hkv, G, bq, bk) and mask (None for a tile inside the band) of tile (query block i, key block j);
  q is pre-scaled. ``key_range``: None or (2, bq) bounds [lo_i, hi_i) of the block's queries."""
  b, h, gbq, _ = qm.shape
  k_start = j * bk
  kj = jax.lax.dynamic_slice_in_dim(kt, k_start, bk, axis=2)
  k_seg = None if kv_seg is None else jax.lax.dynamic_slice_in_dim(kv_seg, k_start, bk, axis=-1)
  s = _dot(qm, kj, "bhmd,bhkd->bhmk").reshape(b, h, gbq // bq, bq, bk)
  mask = common.block_mask(st, i * bq, k_start, bq, bk, q_seg, k_seg) if masked else None
  if key_range is not None:
    key = k_start + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    in_range = (key >= key_range[0][:, None]) & (key < key_range[1][:, None])
    mask = in_range if mask is None else jnp.logical_and(mask, in_range)
  return s, mask, kj


def _loop_key_blocks(st: FlashStatic, i, bq: int, bk: int, nk: int, body, carry, key_range=None):
  """Runs ``body(j, carry, masked)`` over the key blocks query block i can see: the band's edge tiles with their
  mask, the tiles entirely inside it without one (no select over the tile). With a key range every tile is
  masked and the loop runs over the blocks between the lowest lo and the highest hi of the block's queries."""
  lo, hi = common.kv_block_start(st, i * bq, bk, nk), common.kv_block_range(st, i * bq, bq, bk, nk)
  if key_range is not None:
    lo = jnp.maximum(lo, jnp.min(key_range[0]) // bk).astype(jnp.int32)
    hi = jnp.minimum(hi, (jnp.max(key_range[1]) + bk - 1) // bk).astype(jnp.int32)
    return jax.lax.fori_loop(lo, jnp.maximum(lo, hi), lambda j, c: body(j, c, True), carry)
  full_lo, full_hi = common.kv_full_block_range(st, i * bq, bq, bk, lo, hi)
  masked = lambda j, c: body(j, c, True)
  carry = jax.lax.fori_loop(lo, full_lo, masked, carry)
  carry = jax.lax.fori_loop(full_lo, full_hi, lambda j, c: body(j, c, False), carry)
  return jax.lax.fori_loop(full_hi, hi, masked, carry)


def _forward(st: FlashStatic, qb, kt, vt, sinks, q_seg, kv_seg, count, key_range):
  """qb (nq, B, Hkv, G, bq, D) pre-scaled; kt, vt (B, Hkv, Kp, D); key_range None or (nq, 2, bq).
  Returns o (nq, ..., bq, Dv), r (nq, ..., bq, 1)."""
  nq, b, h, g, bq, d = qb.shape
  bk, dv = st.blocks.block_kv, vt.shape[-1]
  nk = kt.shape[2] // bk

  def q_block(_, xs):
    i, qi, q_seg_i, n, range_i = xs
    qm = qi.reshape(b, h, g * bq, d)

    def body(j, carry, masked):
      s, mask, _ = _tile(st, i, j, bq, bk, qm, kt, q_seg_i, kv_seg, range_i, masked)
      vj = jax.lax.dynamic_slice_in_dim(vt, j * bk, bk, axis=2)
      return common.fwd_block(st, s, mask, n, vj, *carry, matmul=_group_matmul)

    carry = common.init_state(st, sinks, n, bq, dv, lead=(b, h, g))
    m, l, acc = _loop_key_blocks(st, i, bq, bk, nk, body, carry, range_i)
    o, r = common.finalize(st, m, l, acc, n)
    return None, (o.astype(qb.dtype), r)

  _, (o, r) = jax.lax.scan(q_block, None, (jnp.arange(nq), qb, q_seg, count, key_range))
  return o, r


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked(st: FlashStatic, qb, kt, vt, sinks, q_seg, kv_seg, count, key_range):
  return _forward(st, qb, kt, vt, sinks, q_seg, kv_seg, count, key_range)


def _blocked_fwd(st, qb, kt, vt, sinks, q_seg, kv_seg, count, key_range):
  o, r = _forward(st, qb, kt, vt, sinks, q_seg, kv_seg, count, key_range)
  return (o, r), (qb, kt, vt, sinks, q_seg, kv_seg, count, key_range, o, r)


def _blocked_bwd(st, res, cotangents):
  qb, kt, vt, sinks, q_seg, kv_seg, count, key_range, o, r = res
  do, dr = cotangents
  nq, b, h, g, bq, d = qb.shape
  bk, dv_dim = st.blocks.block_kv, vt.shape[-1]
  nk = kt.shape[2] // bk
  # delta_i = sum_j p_ij dp_ij = do_i . o_i; a cotangent on r_i enters every score's ds as -dr_i.
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True) - dr

  def q_block(carry, xs):
    i, qi, do_i, r_i, delta_i, q_seg_i, n, range_i = xs
    qm = qi.reshape(b, h, g * bq, d)
    dom = do_i.reshape(b, h, g * bq, dv_dim)

    def body(j, carry, masked):
      dq, dk, dv = carry
      s, mask, kj = _tile(st, i, j, bq, bk, qm, kt, q_seg_i, kv_seg, range_i, masked)
      vj = jax.lax.dynamic_slice_in_dim(vt, j * bk, bk, axis=2)
      dp = _dot(dom, vj, "bhmd,bhkd->bhmk").reshape(s.shape)
      p, ds = common.bwd_block(st, s, mask, r_i, n, dp, delta_i)
      p, ds = p.reshape(b, h, g * bq, bk), ds.reshape(b, h, g * bq, bk)
      dq = dq + _dot(ds.astype(kj.dtype), kj, "bhmk,bhkd->bhmd")
      k_start = j * bk
      dk_j = jax.lax.dynamic_slice_in_dim(dk, k_start, bk, axis=2) + _dot(ds.astype(qm.dtype), qm,
                                                                            "bhmk,bhmd->bhkd")
      dv_j = jax.lax.dynamic_slice_in_dim(dv, k_start, bk, axis=2) + _dot(p.astype(dom.dtype), dom,
                                                                            "bhmk,bhmd->bhkd")
      dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j, k_start, axis=2)
      dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_j, k_start, axis=2)
      return dq, dk, dv

    dq, dk, dv = _loop_key_blocks(st, i, bq, bk, nk, body, (jnp.zeros((b, h, g * bq, d), jnp.float32), *carry),
                                  range_i)
    return (dk, dv), dq.reshape(qi.shape)

  zeros_k = jnp.zeros(kt.shape, jnp.float32)
  zeros_v = jnp.zeros(vt.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(q_block, (zeros_k, zeros_v), (jnp.arange(nq), qb, do, r, delta, q_seg, count,
                                                                key_range))
  dsinks = None
  if sinks is not None:  # the sink is a key with value 0: d sink_h = -sum_{b,i} p_sink * delta
    dsinks = -jnp.sum(jnp.exp(sinks - r) * delta, axis=(0, 1, 4, 5)).reshape(sinks.shape)
  return dq.astype(qb.dtype), dk.astype(kt.dtype), dv.astype(vt.dtype), dsinks, None, None, None, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def _check_key_range(key_range, q_len: int, score: str, needs_count: bool):
  if needs_count:
    raise ValueError(f"key_range: score function {score!r} depends on the visible-key count, which a key range "
                     f"does not enter; use it with scores that do not")
  if len(key_range) != 2:
    raise ValueError(f"key_range must be a pair (lo, hi); got {len(key_range)} items")
  lo, hi = (jnp.asarray(x) for x in key_range)
  if lo.shape != (q_len,) or hi.shape != (q_len,) or not all(jnp.issubdtype(x.dtype, jnp.integer) for x in (lo, hi)):
    raise ValueError(f"key_range (lo, hi) must be integer arrays of shape (q_len,) = ({q_len},); got "
                     f"{lo.dtype}{tuple(lo.shape)} and {hi.dtype}{tuple(hi.shape)}")
  return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _pad_axis(x, axis: int, length: int, value=0):
  if x.shape[axis] == length:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, score: str = "softmax", causal: bool = True,
                      window: int | None = None, scale: float | None = None, segment_ids: Any = None,
                      sink_logits: jax.Array | None = None, block_q: int | None = None, block_kv: int | None = None,
                      return_residuals: bool = False, key_range: tuple[jax.Array, jax.Array] | None = None,
                      **score_params):
  """Flash-style attention in pure JAX; same semantics as :func:`attnlab.attend` (no dense bias/mask).

  Args:
    q: (batch, q_len, num_heads, head_dim); k, v: (batch, kv_len, num_kv_heads, head_dim | v_dim).
    score, causal, scale, segment_ids, sink_logits, **score_params: as :func:`attnlab.attend`.
    window: sliding window W: the query at absolute position p = i + kv_len - q_len sees keys p - W < j <= p.
    block_q, block_kv: tile sizes (default :func:`default_blocks`, clamped to the lengths; lengths need not be
      multiples of them).
    return_residuals: also return r (batch, num_heads, q_len): the row log-sum-exp for softmax (sink included;
      sink mass = exp(sink_h - r_i)), the log row denominator for the normalised scores.
    key_range: optional (lo, hi), int arrays (q_len,): query i sees only keys lo_i <= j < hi_i (on top of the
      other masks; key blocks outside [min lo, max hi) of a query block are skipped). A query that sees no key gets
      o = 0 and r = -0.7 * float32 max. Not with scores whose weights depend on the visible-key count.

  Returns:
    o (batch, q_len, num_heads, v_dim) in q.dtype, and r if ``return_residuals``.
  """
  check_inputs(q, k, v)
  window = check_window(window)
  fn = get_score(score)
  fn.check_params(score_params)
  if fn.blockwise is None:
    raise ValueError(f"score function {score!r} has no Blockwise hooks; use impl='xla'")
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads, v_dim = k.shape[1], k.shape[2], v.shape[3]
  groups = heads // kv_heads
  ctx = ScoreContext(q_len=q_len, kv_len=kv_len, head_dim=head_dim)
  hooks = fn.blockwise(ctx, **score_params)
  if key_range is not None:
    key_range = _check_key_range(key_range, q_len, score, hooks.needs_count)
  q, k, scale = fn.prepare_inputs(q, k, scale, ctx, score_params)
  sinks = fn.check_sink_logits(sink_logits, heads)

  default_q, default_kv = default_blocks(kv_len)
  bq = min(block_q or default_q, q_len)
  bk = min(block_kv or default_kv, kv_len)
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  qp, kp = nq * bq, nk * bk
  st = FlashStatic(score=hooks, causal=bool(causal), scale=float(scale), blocks=BlockSizes(bq, bk, bq, bk),
                   q_len=q_len, kv_len=kv_len, groups=groups, has_segments=segment_ids is not None,
                   has_sinks=sinks is not None, interpret=False, window=window,
                   kv_valid=kv_len if kp != kv_len else None)

  # Layouts: q blocks (nq, B, Hkv, G, bq, D) pre-scaled; k, v (B, Hkv, Kp, D). O(n d) copies only.
  qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
  qb = _pad_axis(qs, 1, qp).reshape(batch, nq, bq, kv_heads, groups, head_dim).transpose(1, 0, 3, 4, 2, 5)
  kt = _pad_axis(k.transpose(0, 2, 1, 3), 2, kp)
  vt = _pad_axis(v.transpose(0, 2, 1, 3), 2, kp)
  if sinks is not None:
    sinks = sinks.reshape(1, kv_heads, groups, 1, 1)

  q_seg, kv_seg = split_segment_ids(segment_ids, batch, q_len, kv_len)
  if q_seg is not None:
    q_seg = _pad_axis(q_seg.astype(jnp.int32), 1, qp, -1)[:, :, None]  # (B, Qp, 1)
    kv_seg = _pad_axis(kv_seg.astype(jnp.int32), 1, kp, -2)[:, None, :]  # (B, 1, Kp)
  count = None
  if hooks.needs_count:
    count = common.visible_counts(st, q_seg, kv_seg, batch=batch, q_len=qp, kv_len=kp, block_kv=bk)
    count = count.reshape(batch, nq, 1, 1, bq, 1).transpose(1, 0, 2, 3, 4, 5)  # (nq, B, 1, 1, bq, 1)
  if q_seg is not None:
    q_seg = q_seg.reshape(batch, nq, 1, 1, bq, 1).transpose(1, 0, 2, 3, 4, 5)
    kv_seg = kv_seg[:, None, None]  # (B, 1, 1, 1, Kp)

  if key_range is not None:  # padded queries: lo = kp, hi = 0 (they see nothing and do not widen a block's loop)
    lo, hi = _pad_axis(key_range[0], 0, qp, kp), _pad_axis(key_range[1], 0, qp, 0)
    key_range = jnp.stack([lo, hi]).reshape(2, nq, bq).transpose(1, 0, 2)  # (nq, 2, bq)

  o, r = _blocked(st, qb, kt, vt, sinks, q_seg, kv_seg, count, key_range)
  o = o.transpose(1, 0, 4, 2, 3, 5).reshape(batch, qp, heads, v_dim)[:, :q_len]
  if not return_residuals:
    return o
  r = r[..., 0].transpose(1, 2, 3, 0, 4).reshape(batch, heads, qp)[..., :q_len]
  return o, r



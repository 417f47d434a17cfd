"""CCA attention for training and prefill (Chen et al., "Core Context Aware Transformers for Long Context
Language Modeling", ICML 2025; arXiv 2412.12465).

    o_t = score(q_t [K^c_{<c(t)} ; K_{c(t)g..t}]^T * scale) [V^c_{<c(t)} ; V_{c(t)g..t}]

with the core tokens K^c, V^c of :mod:`attnlab.attention.cca.pooling`. Every earlier token is covered exactly
once, by a visible core token or by the locality window; g = 1 or s >= L is exactly causal attention.

Two implementations, neither of which builds an (L x L) score matrix:

* ``"blocked"`` (softmax): two calls of the blocked flash core (:mod:`attnlab.attention.blocked`), one over the
  core keys p in [0, c(t)), one over the raw keys j in [c(t) g, t], merged by their row log-sum-exps. Tiles
  outside a query block's key ranges are skipped and the backward pass recomputes tiles (O(L d) memory).
* ``"xla"`` (every score function): blocked over queries; a block of ``block_q`` queries sees all L // g core keys
  (masked) and a band of ``block_q + s + g`` raw keys as one fused row, cost and memory
  O(L (L/g + s + g + block_q) d); with ``remat`` each block is recomputed in the backward pass.

``"auto"`` takes ``"blocked"`` for softmax (fwd+bwd 1.7-2.9x faster than ``"xla"`` on CPU at L = 2k-16k, g 16,
s 1024, with 1.6-3.4x smaller temporaries: benchmarks/efficient_vs_softmax.py times both) and ``"xla"`` otherwise.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attnlab.attention.cca.pooling import (check_cca_params, pool_core, pooling_weights, split_heads,
                                          visible_core_count)
from attnlab.attention.blocked import blocked_attention
from attnlab.attention.cca.rows import attend_rows, grouped_sinks, prepare_inputs
from attnlab.ops.dense import check_inputs
from attnlab.ops.scores import ScoreContext, get_score


def _setup(q, k, v, group_size, window_size, score, sink_logits, score_params):
  check_inputs(q, k, v)
  check_cca_params(group_size, window_size)
  fn = get_score(score)
  fn.check_params(score_params)
  if sink_logits is not None and not fn.supports_sink_logits:
    raise ValueError(f"score function {score!r} does not support sink_logits")
  ctx = ScoreContext(q_len=q.shape[1], kv_len=k.shape[1], head_dim=q.shape[3])
  sinks = grouped_sinks(sink_logits, q.shape[2], k.shape[2])
  return fn, ctx, sinks


def _band_masks(t0, band_start, block_q: int, width: int, num_core: int, g: int, s: int):
  """Masks of one query block: core p < c(t); raw key j (absolute) in [c(t) g, t]."""
  t = t0 + jnp.arange(block_q)
  c = visible_core_count(t, g, s)[:, None]
  mask_core = jnp.arange(num_core)[None, :] < c
  j = band_start + jnp.arange(width)[None, :]
  mask_raw = (j >= c * g) & (j <= t[:, None])
  return mask_core, mask_raw


CCA_IMPLS = ("auto", "blocked", "xla")


def check_cca_impl(impl: str, score: str, field: str = "CCA impl") -> None:
  """Raises ValueError unless ``impl`` is one of :data:`CCA_IMPLS` and fits ``score`` ("blocked": softmax only)."""
  if impl not in CCA_IMPLS:
    raise ValueError(f"{field} must be one of {CCA_IMPLS}; got {impl!r}")
  if impl == "blocked" and score != "softmax":
    raise ValueError(f"{field}='blocked' runs the softmax score only (its two parts merge by log-sum-exp); got "
                     f"score={score!r}: use impl='xla'")


def cca_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, group_size: int, window_size: int,
                  score: str = "softmax", scale: float | None = None, sink_logits: jax.Array | None = None,
                  block_q: int = 512, remat: bool = True, impl: str = "auto", **score_params: Any) -> jax.Array:
  """Causal CCA attention, blocked over queries.

  Args:
    q: (batch, seq, num_heads, head_dim), after RoPE. k, v: (batch, seq, num_kv_heads, head_dim).
    group_size: g, tokens per core token. window_size: s, locality window; s % g == 0.
    score: registered score function applied to each fused row [core ; local].
    scale: logit scale (default 1/sqrt(head_dim), or the score function's own default).
    sink_logits: (num_heads,) sink logits (softmax only).
    block_q: queries per block (``"xla"``: sequences of at most ``block_q`` tokens run as one dense block).
    remat: ``"xla"``: recompute each block in the backward pass instead of storing its scores.
    impl: ``"auto"``, ``"blocked"`` (softmax only) or ``"xla"`` (see the module docstring).
    **score_params: parameters of the score function.

  Returns:
    (batch, seq, num_heads, head_dim) in q.dtype.
  """
  fn, ctx, sinks = _setup(q, k, v, group_size, window_size, score, sink_logits, score_params)
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"cca_attention is self-attention: q and k lengths differ ({q.shape[1]} vs {k.shape[1]}); "
                     f"use cca_decode_step to decode with a cache")
  if block_q < 1:
    raise ValueError(f"block_q must be >= 1; got {block_q}")
  check_cca_impl(impl, score)
  if score == "softmax" and impl != "xla":
    out = _cca_blocked(*(x.astype(jnp.float32) for x in (q, k, v)), group_size=group_size,
                       window_size=window_size, scale=scale, sink_logits=sink_logits, block_q=block_q)
    return out.astype(q.dtype)
  g, s = group_size, window_size
  b, n, h, d = q.shape
  kv_heads = k.shape[2]
  bq = min(block_q, n)
  n_pad = -(-n // bq) * bq
  nb = n_pad // bq
  front = min(s + g, n_pad - bq)  # raw keys before a block that its queries may still see
  width = bq + front

  pad_end = lambda x: jnp.pad(x, ((0, 0), (0, n_pad - n), (0, 0), (0, 0)))
  q, k, v = pad_end(q), pad_end(k), pad_end(v)
  core_k, core_v = pool_core(q, k, v, g)
  qp, kp, core_k, scale = prepare_inputs(fn, q, k, core_k, scale, ctx, score_params)
  num_core = core_k.shape[1]

  q_blocks = jnp.moveaxis(split_heads(qp, kv_heads).reshape(b, nb, bq, kv_heads, h // kv_heads, d), 1, 0)
  idx = jnp.arange(nb)[:, None] * bq + jnp.arange(width)[None, :]  # into the front-padded keys
  front_pad = lambda x: jnp.pad(x, ((0, 0), (front, 0), (0, 0), (0, 0)))
  k_bands = jnp.moveaxis(front_pad(kp)[:, idx], 1, 0)  # (nb, B, width, Hkv, d)
  v_bands = jnp.moveaxis(front_pad(v.astype(jnp.float32))[:, idx], 1, 0)
  starts = jnp.arange(nb) * bq

  def block(args):
    qb, kb, vb, t0 = args
    mask_core, mask_raw = _band_masks(t0, t0 - front, bq, width, num_core, g, s)
    o, _, _ = attend_rows(qb, core_k, core_v, kb, vb, mask_core, mask_raw, fn=fn, scale=scale, sinks=sinks,
                          ctx=ctx, params=score_params)
    return o

  if remat:
    block = jax.checkpoint(block)
  out = jax.lax.map(block, (q_blocks, k_bands, v_bands, starts))  # (nb, B, bq, Hkv, G, d)
  out = jnp.moveaxis(out, 0, 1).reshape(b, n_pad, h, v.shape[-1])[:, :n]
  return out.astype(q.dtype)


def _cca_blocked(q, k, v, *, group_size: int, window_size: int, scale, sink_logits, block_q: int):
  """Softmax CCA as two calls of the blocked core merged by their row log-sum-exps r:

      o_t = e^{r^c_t - r_t} o^c_t + e^{r^w_t - r_t} o^w_t,   r_t = log(e^{r^c_t} + e^{r^w_t})

  o^c over the core keys p in [0, c(t)), o^w over the raw keys j in [c(t) g, t] (and the sink). Masked tiles are
  skipped and the backward pass recomputes tiles from r (no (block x keys) residuals)."""
  g, s = group_size, window_size
  b, n, h, d = q.shape
  t = jnp.arange(n, dtype=jnp.int32)
  c = visible_core_count(t, g, s)
  o_w, r_w = blocked_attention(q, k, v, causal=True, scale=scale, sink_logits=sink_logits, key_range=(c * g, t + 1),
                               return_residuals=True, block_q=block_q)
  if (n - s) // g <= 0:  # c(n - 1) = 0: no query sees a core token
    return o_w
  core_k, core_v = pool_core(q, k, v, g)
  core_k, core_v = (x.reshape(b, x.shape[1], h, d) for x in (core_k, core_v))  # one core head per query head
  o_c, r_c = blocked_attention(q, core_k, core_v, causal=False, scale=scale, key_range=(jnp.zeros_like(c), c),
                               return_residuals=True, block_q=block_q)
  r = jnp.logaddexp(r_c, r_w)
  weight = lambda r_part: jnp.exp(r_part - r).transpose(0, 2, 1)[..., None]  # (B, n, H, 1)
  return weight(r_c) * o_c + weight(r_w) * o_w


def cca_weights(q: jax.Array, k: jax.Array, *, group_size: int, window_size: int, score: str = "softmax",
                scale: float | None = None, sink_logits: jax.Array | None = None,
                **score_params: Any) -> jax.Array:
  """Effective dense weights A (batch, num_heads, seq, seq), float32, with ``o = A v`` (for analysis).

  A core weight a_tp is spread over its group's tokens by the pooling weights: A_tj = a_tp w_pj for j in group p
  (p < c(t)) and A_tj = a_tj for j in the locality window. Builds (seq x seq) arrays: short sequences only.
  """
  fn, ctx, sinks = _setup(q, k, k, group_size, window_size, score, sink_logits, score_params)
  g, s = group_size, window_size
  b, n, h, _ = q.shape
  kv_heads = k.shape[2]
  core_k, _ = pool_core(q, k, k, g)
  qp, kp, core_kp, scale = prepare_inputs(fn, q, k, core_k, scale, ctx, score_params)
  mask_core, mask_raw = _band_masks(0, 0, n, n, core_k.shape[1], g, s)
  _, w_core, w_raw = attend_rows(split_heads(qp, kv_heads), core_kp, core_k, kp, kp, mask_core, mask_raw, fn=fn,
                                 scale=scale, sinks=sinks, ctx=ctx, params=score_params)
  pw = pooling_weights(q, k, g)  # (B, C, Hkv, G, g)
  spread = jnp.einsum("bhgqc,bchgj->bhgqcj", w_core, pw).reshape(w_core.shape[:-1] + (-1,))
  spread = jnp.pad(spread, [(0, 0)] * 4 + [(0, n - spread.shape[-1])])
  return (w_raw + spread).reshape(b, h, n, n)


def cca_num_keys(seq_len: int, group_size: int, window_size: int) -> float:
  """Mean number of keys per query row (core + window), e.g. to report the sparsity of a configuration."""
  t = jnp.arange(seq_len)
  c = visible_core_count(t, group_size, window_size)
  return float(jnp.mean(c + (t + 1 - c * group_size)))



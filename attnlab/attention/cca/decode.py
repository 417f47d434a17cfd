"""CCA decoding with the compressed KV cache (the authors' ``pooling_attention_w_cache`` + ``cache_simple``).

Per layer the cache holds the core tokens pooled so far and the q/k/v of at most s + g recent raw tokens (queries
are kept because a group is pooled with the query of its last token). After appending token t the buffer holds
tokens [n_core g, t]; when it reaches s + g tokens (i.e. c(t) = n_core + 1) its oldest g tokens are pooled into a
new core token and dropped. Token t then attends to [core tokens ; buffer] = exactly the keys of the full forward,
so prefill + step-by-step decoding reproduces :func:`cca_attention` at every length. Memory per layer:
O((L/g + s + g) d) instead of O(L d). Unlike the authors' code, every layer is compressed (theirs keeps full caches
in layers 0 and 1, which then differ from their own training forward).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from attnlab.attention.cca.forward import _setup, cca_attention
from attnlab.attention.cca.pooling import pool_core, split_heads
from attnlab.attention.cca.rows import attend_rows, prepare_inputs
from attnlab.ops.scores import ScoreContext


class CCACache(NamedTuple):
  """Compressed cache of one layer (a pytree). Counters are shared by the batch."""

  core_k: jax.Array  # (B, max_core, Hkv, G, d) float32; the first num_core are valid
  core_v: jax.Array
  q: jax.Array  # (B, s + g, H, d) raw queries of the buffered tokens; the first count are valid
  k: jax.Array  # (B, s + g, Hkv, d)
  v: jax.Array
  num_core: jax.Array  # int32 ()
  count: jax.Array  # int32 ()
  length: jax.Array  # int32 (): tokens seen


def cca_init_cache(batch: int, max_len: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                   group_size: int, window_size: int, dtype=jnp.float32) -> CCACache:
  """Empty cache for sequences of at most ``max_len`` tokens."""
  g, s = group_size, window_size
  max_core = max(1, (max_len - s) // g)
  core = jnp.zeros((batch, max_core, num_kv_heads, num_heads // num_kv_heads, head_dim), jnp.float32)
  zero = jnp.zeros((), jnp.int32)
  return CCACache(core, core, jnp.zeros((batch, s + g, num_heads, head_dim), dtype),
                  jnp.zeros((batch, s + g, num_kv_heads, head_dim), dtype),
                  jnp.zeros((batch, s + g, num_kv_heads, head_dim), dtype), zero, zero, zero)


def cca_prefill(q: jax.Array, k: jax.Array, v: jax.Array, *, max_len: int, group_size: int, window_size: int,
                score: str = "softmax", scale: float | None = None, sink_logits: jax.Array | None = None,
                block_q: int = 512, remat: bool = False, impl: str = "auto",
                **score_params: Any) -> tuple[jax.Array, CCACache]:
  """Full CCA forward over the prompt and the compressed cache it leaves (see :func:`cca_attention`)."""
  g, s = group_size, window_size
  b, n, h, d = q.shape
  if n > max_len:
    raise ValueError(f"prompt length {n} exceeds max_len {max_len}")
  out = cca_attention(q, k, v, group_size=g, window_size=s, score=score, scale=scale, sink_logits=sink_logits,
                      block_q=block_q, remat=remat, impl=impl, **score_params)
  cache = cca_init_cache(b, max_len, h, k.shape[2], d, group_size=g, window_size=s, dtype=k.dtype)
  num_core = max(0, (n - s) // g)
  start = num_core * g
  core_k, core_v = pool_core(q[:, :start], k[:, :start], v[:, :start], g)
  count = n - start
  cache = cache._replace(
      core_k=cache.core_k.at[:, :num_core].set(core_k), core_v=cache.core_v.at[:, :num_core].set(core_v),
      q=cache.q.at[:, :count].set(q[:, start:].astype(cache.q.dtype)),
      k=cache.k.at[:, :count].set(k[:, start:].astype(cache.k.dtype)),
      v=cache.v.at[:, :count].set(v[:, start:].astype(cache.v.dtype)),
      num_core=jnp.asarray(num_core, jnp.int32), count=jnp.asarray(count, jnp.int32),
      length=jnp.asarray(n, jnp.int32))
  return out, cache


def cca_decode_step(cache: CCACache, q: jax.Array, k: jax.Array, v: jax.Array, *, group_size: int,
                    window_size: int, score: str = "softmax", scale: float | None = None,
                    sink_logits: jax.Array | None = None, **score_params: Any) -> tuple[jax.Array, CCACache]:
  """Attends one new token (q (B, 1, H, d), k/v (B, 1, Hkv, d), after RoPE) and updates the cache.

  The cache must have room: at most ``max_len`` tokens in all (not checked under jit). Score functions whose
  weights read ``ctx.kv_len`` (sigmoid's default bias -log(kv_len)) see the cache size
  ``kv_len = max_core + s + g`` here instead of the sequence length, so pass ``b`` explicitly to decode with
  sigmoid.
  """
  g, s = group_size, window_size
  if q.shape[1] != 1:
    raise ValueError(f"cca_decode_step takes one token; got q of shape {tuple(q.shape)}")
  fn, _, sinks = _setup(q, k, v, g, s, score, sink_logits, score_params)
  if cache.k.shape[1] != s + g:
    raise ValueError(f"cache buffer holds {cache.k.shape[1]} tokens but s + g = {s + g}")
  kv_heads = k.shape[2]
  cnt = cache.count
  put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), cnt, axis=1)
  qb, kb, vb = put(cache.q, q), put(cache.k, k), put(cache.v, v)
  cnt = cnt + 1
  due = cnt == s + g  # c(t) = num_core + 1: pool the oldest g buffered tokens
  new_k, new_v = pool_core(qb[:, :g], kb[:, :g], vb[:, :g], g)
  add = lambda core, x: jnp.where(due, jax.lax.dynamic_update_slice_in_dim(core, x, cache.num_core, axis=1), core)
  core_k, core_v = add(cache.core_k, new_k), add(cache.core_v, new_v)
  num_core = cache.num_core + due.astype(jnp.int32)
  shift = lambda buf: jnp.where(due, jnp.roll(buf, -g, axis=1), buf)
  qb, kb, vb = shift(qb), shift(kb), shift(vb)
  cnt = cnt - g * due.astype(jnp.int32)

  ctx = ScoreContext(q_len=1, kv_len=core_k.shape[1] + s + g, head_dim=q.shape[3])
  qp, kp, core_kp, scale = prepare_inputs(fn, q, kb, core_k, scale, ctx, score_params)
  mask_core = jnp.arange(core_k.shape[1]) < num_core
  mask_raw = jnp.arange(s + g) < cnt
  o, _, _ = attend_rows(split_heads(qp, kv_heads), core_kp, core_v, kp, vb, mask_core, mask_raw, fn=fn,
                        scale=scale, sinks=sinks, ctx=ctx, params=score_params)
  out = o.reshape(q.shape[:3] + (v.shape[-1],)).astype(q.dtype)
  return out, CCACache(core_k, core_v, qb, kb, vb, num_core, cnt, cache.length + 1)

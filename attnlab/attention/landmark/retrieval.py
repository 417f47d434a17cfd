"""Landmark inference: a KV cache of complete blocks and top-k block retrieval per query and head.

Mohtashami & Jaggi 2023, §3.2 / reference code epfml/landmark-attention (``llama/llama_mem.py``,
``lm_benchmark/models/caches/mem_cache.py``). The token stream has a landmark at every position ``p`` with
``p % B == B - 1`` (``B`` = block size, landmark included); it is processed chunk by chunk:

1. Per layer the cache keeps the pre-RoPE keys and the values of the last ``cache_blocks`` complete blocks
   (a ring buffer: the cache size limit) and of the current incomplete block (the "tail", < B tokens).
2. Each query (per head) scores the landmark keys of the cached blocks and retrieves the ``top_k`` best blocks
   (``selection``: per token and head, or the max of the retrieval probabilities over heads / over the chunk).
3. It attends over ``[retrieved blocks | tail | chunk]`` with the training grouped softmax
   (:func:`grouped_softmax_weights`): a retrieved block contributes ``P(its landmark) × in-block softmax``.

Position mapping (the reference LLaMA code): with ``N`` complete blocks so far, ``k = min(top_k, cached)`` and
``prefix = (N - k - 1)·B``, the retrieved blocks, in chronological order ``r = 0..k-1``, are placed at
``prefix + (r + [block is among the k most recent])·B``; landmark keys are scored at the landmark slot of the
same layout (older blocks at slot 0, the ``k`` most recent at slots 1..k). The tail and the chunk keep their
true positions. So relative distances never exceed ``(k + 1)·B + B + chunk``, and when the retrieved blocks are
the most recent ones they sit at their true positions: with ``top_k >=`` the number of cached blocks, retrieval
inference equals the training forward. Positions are shifted by ``max(prefix, 0)`` (RoPE is relative) to keep
them small.

Shapes are static in the chunk length only (counts live in masks), so one compilation serves a whole context.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnlab.attention.landmark.grouped_softmax import NEG, grouped_softmax_weights
from attnlab.layers import apply_rope

SELECTIONS = ("per_token_and_head", "max_over_heads", "max_over_tokens")


class LandmarkCache(NamedTuple):
  """Per-layer cache. ``keys``/``values``: (batch, cache_blocks, block_size, kv_heads, head_dim) ring buffer of
  complete blocks (keys before RoPE); ``tail_keys``/``tail_values``: (batch, block_size - 1, kv_heads, head_dim)
  the incomplete block. How much of each is filled follows from the stream position (see module docstring)."""

  keys: jax.Array
  values: jax.Array
  tail_keys: jax.Array
  tail_values: jax.Array


def init_cache(batch: int, cache_blocks: int, block_size: int, kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> LandmarkCache:
  if cache_blocks < 1 or block_size < 2:
    raise ValueError(f"need cache_blocks >= 1 and block_size >= 2; got {cache_blocks}, {block_size}")
  full = jnp.zeros((batch, cache_blocks, block_size, kv_heads, head_dim), dtype)
  tail = jnp.zeros((batch, block_size - 1, kv_heads, head_dim), dtype)
  return LandmarkCache(full, full, tail, tail)


def _rope(x: jax.Array, positions: jax.Array, base: float | None) -> jax.Array:
  """RoPE of ``x`` (..., d) at ``positions`` broadcastable to x.shape[:-1]; identity when ``base`` is None."""
  if base is None:
    return x
  pos = jnp.broadcast_to(positions, x.shape[:-1]).reshape(-1, 1)
  return apply_rope(x.reshape(-1, 1, 1, x.shape[-1]), pos, base).reshape(x.shape)


def _retrieval_logits(r: jax.Array, selection: str) -> jax.Array:
  """(b, H, T, C) block scores -> scores whose top-k is the selection."""
  if selection == "per_token_and_head":
    return r
  logp = jax.nn.log_softmax(r, axis=-1)  # comparable across heads / tokens (the reference softmaxes first)
  if selection == "max_over_heads":
    return jnp.broadcast_to(jnp.max(logp, axis=1, keepdims=True), r.shape)
  return jnp.broadcast_to(jnp.max(logp, axis=2, keepdims=True), r.shape)


def _update_cache(cache: LandmarkCache, k: jax.Array, v: jax.Array, start: jax.Array, block: int) -> LandmarkCache:
  """Appends the chunk to the tail; blocks it completes go to ring slots ``block_number % cache_blocks``."""
  b, t, hkv, d = k.shape
  cap = cache.keys.shape[1]
  n_blocks, p = start // block, start % block
  total = p + t
  m = total // block
  m_max = (block - 1 + t) // block
  idx = jnp.arange(m_max)
  keep = (idx < m) & (idx >= m - cap)
  dst = jnp.where(keep, (n_blocks + idx) % cap, cap)  # out of range -> dropped

  def append(tail, new, full):
    buf = jnp.concatenate([tail, jnp.zeros((b, t + block - 1, hkv, d), tail.dtype)], axis=1)
    buf = jax.lax.dynamic_update_slice_in_dim(buf, new.astype(tail.dtype), p, axis=1)
    blocks = buf[:, :m_max * block].reshape(b, m_max, block, hkv, d)
    full = full.at[:, dst].set(blocks, mode="drop")
    return full, jax.lax.dynamic_slice_in_dim(buf, m * block, block - 1, axis=1)

  keys, tail_k = append(cache.tail_keys, k, cache.keys)
  values, tail_v = append(cache.tail_values, v, cache.values)
  return LandmarkCache(keys, values, tail_k, tail_v)


def retrieval_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: LandmarkCache, start: jax.Array, *,
                        top_k: int, selection: str = "per_token_and_head", rope_base: float | None = 10_000.0,
                        scale: float | None = None) -> tuple[jax.Array, LandmarkCache]:
  """One layer's attention for a chunk, with retrieval from ``cache``; returns (output, updated cache).

  Args:
    q: (batch, T, num_heads, head_dim); k, v: (batch, T, kv_heads, head_dim): projections of the chunk
      BEFORE RoPE (it is applied here, with the position mapping above). Landmark tokens must sit at stream
      positions ``p % block_size == block_size - 1``.
    cache: this layer's :class:`LandmarkCache` (block size and cache size are read from its shape).
    start: stream position of the chunk's first token (int scalar; may be traced).
    top_k: blocks retrieved per query (and head), 1 <= top_k <= cache_blocks.
    selection: one of ``SELECTIONS``.
    rope_base: RoPE base, or None for NoPE.
    scale: logit scale, default ``1/sqrt(head_dim)``.
  """
  b, t, heads, d = q.shape
  hkv = k.shape[2]
  cap, block = cache.keys.shape[1], cache.keys.shape[2]
  if k.shape != (b, t, hkv, d) or v.shape != k.shape or heads % hkv:
    raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} do not form a (GQA) chunk")
  if cache.keys.shape[3:] != (hkv, d) or cache.keys.shape[0] != b:
    raise ValueError(f"cache {cache.keys.shape} does not match the chunk's (batch, kv_heads, head_dim)")
  if not 1 <= top_k <= cap:
    raise ValueError(f"top_k must be in [1, cache_blocks={cap}]; got {top_k}")
  if selection not in SELECTIONS:
    raise ValueError(f"selection must be one of {SELECTIONS}; got {selection!r}")
  g = heads // hkv
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  f32 = lambda x: x.astype(jnp.float32)
  start = jnp.asarray(start, jnp.int32)
  n_blocks, p = start // block, start % block
  k_eff = jnp.minimum(top_k, jnp.minimum(n_blocks, cap))
  prefix = (n_blocks - k_eff - 1) * block
  base = jnp.maximum(prefix, 0)

  slots = jnp.arange(cap)
  slot_block = n_blocks - 1 - jnp.mod(n_blocks - 1 - slots, cap)  # block number held by each slot
  slot_valid = slots < n_blocks
  recent_slot = jnp.where(slot_block >= n_blocks - k_eff, slot_block - (n_blocks - k_eff) + 1, 0)

  q_rot = _rope(f32(q), (start - base + jnp.arange(t))[None, :, None], rope_base)
  lm_keys = _rope(f32(cache.keys[:, :, block - 1]), (prefix - base + recent_slot * block + block - 1)[None, :, None],
                  rope_base)
  r = jnp.einsum("bthd,bchd->bhtc", q_rot, jnp.repeat(lm_keys, g, axis=2)) * scale
  r = _retrieval_logits(jnp.where(slot_valid, r, NEG), selection)
  _, sel = jax.lax.top_k(r, top_k)  # (b, H, T, top_k) slots
  sel_valid = slot_valid[sel]
  order = jnp.argsort(jnp.where(sel_valid, slot_block[sel], jnp.iinfo(jnp.int32).max), axis=-1)
  sel = jnp.take_along_axis(sel, order, axis=-1)  # chronological
  sel_valid = jnp.take_along_axis(sel_valid, order, axis=-1)
  is_recent = slot_block[sel] >= n_blocks - k_eff
  first = prefix - base + (jnp.arange(top_k) + is_recent) * block
  tok_pos = first[..., None] + jnp.arange(block)  # (b, H, T, top_k, block)

  bi = jnp.arange(b)[:, None, None, None]
  kvh = (jnp.arange(heads) // g)[None, :, None, None]
  pre_k = _rope(f32(cache.keys[bi, sel, :, kvh]), tok_pos, rope_base).reshape(b, heads, t, top_k * block, d)
  pre_v = f32(cache.values[bi, sel, :, kvh]).reshape(b, heads, t, top_k * block, d)

  local_k = jnp.concatenate([f32(cache.tail_keys), f32(k)], axis=1)
  local_v = jnp.concatenate([f32(cache.tail_values), f32(v)], axis=1)
  local_pos = jnp.concatenate([n_blocks * block + jnp.arange(block - 1), start + jnp.arange(t)]) - base
  local_k = jnp.repeat(_rope(local_k, local_pos[None, :, None], rope_base), g, axis=2)
  local_v = jnp.repeat(local_v, g, axis=2)

  s = jnp.concatenate([jnp.einsum("bthd,bhtkd->bhtk", q_rot, pre_k),
                       jnp.einsum("bthd,blhd->bhtl", q_rot, local_k)], axis=-1) * scale
  n_pre = top_k * block
  pattern = jnp.arange(block) == block - 1
  key_is_mem = jnp.concatenate([jnp.tile(pattern, top_k), jnp.zeros(block - 1, bool),
                                (start + jnp.arange(t)) % block == block - 1])
  visible = jnp.concatenate([
      jnp.repeat(sel_valid, block, axis=-1),
      jnp.broadcast_to(jnp.arange(block - 1) < p, (b, heads, t, block - 1)),
      jnp.ones((b, heads, t, t), bool)], axis=-1)
  w = grouped_softmax_weights(s, jnp.broadcast_to(key_is_mem, (b, s.shape[-1])),
                              n_pre + block - 1 + jnp.arange(t), visible)
  o = jnp.einsum("bhtk,bhtkd->bthd", w[..., :n_pre], pre_v) + jnp.einsum("bhtl,blhd->bthd", w[..., n_pre:], local_v)
  return o.astype(q.dtype), _update_cache(cache, k, v, start, block)

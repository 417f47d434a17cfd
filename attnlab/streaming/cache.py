"""StreamingLLM's KV-cache policy: keep the first ``n_sink`` tokens plus a rolling window of recent ones.

Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks" (ICLR; ``streaming_llm/kv_cache.py``
``StartRecentKVCache`` and ``pos_shift/modify_llama.py``). The cache holds at most ``capacity = n_sink + window``
entries, the current token included; when full, the oldest entry after the sinks is evicted. Keys are cached
BEFORE RoPE and, with ``pos_shift`` (the reference behaviour), rotated at every step by their position inside the
cache ``0..n-1`` while the query takes position ``n-1``; without it, each key keeps its original position.
``n_sink = 0`` is plain window attention (the paper's "window attention" baseline, which collapses).

:class:`StreamingPolicy` is the :class:`attnlab.attention.cache.CachePolicy` with StreamingLLM's defaults; the
model's decode path (:meth:`attnlab.DecoderLM.step`) serves it with a ring cache. :class:`KVCache` and
:func:`insert` below are the literal evict-and-shift buffer of the reference code, kept as a readable
specification of the eviction order (the ring cache keeps the same tokens).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnlab.attention.cache import CachePolicy


@dataclasses.dataclass(frozen=True)
class StreamingPolicy(CachePolicy):
  """``n_sink`` initial tokens + ``window`` most recent tokens (the current one included)."""

  n_sink: int = 4
  window: int = 1020
  pos_shift: bool = True  # positions inside the cache (StreamingLLM); False: original positions

  def __post_init__(self):
    if self.window is None:
      raise ValueError("a StreamingPolicy needs a window")
    super().__post_init__()

  @property
  def name(self) -> str:
    shift = "" if self.pos_shift else ", original positions"
    return f"{self.n_sink}+{self.window}{shift}"


class KVCache(NamedTuple):
  """One layer's cache: un-rotated keys and values (batch, capacity, kv_heads, head_dim), the original position of
  every slot (capacity,), and the number of filled slots (a scalar)."""

  keys: jax.Array
  values: jax.Array
  positions: jax.Array
  length: jax.Array

  @classmethod
  def empty(cls, policy: StreamingPolicy, batch: int, kv_heads: int, head_dim: int, dtype=jnp.float32) -> "KVCache":
    shape = (batch, policy.capacity, kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((policy.capacity,), jnp.int32),
               jnp.zeros((), jnp.int32))

  @property
  def valid(self) -> jax.Array:
    return jnp.arange(self.keys.shape[1]) < self.length


def insert(cache: KVCache, k: jax.Array, v: jax.Array, position: jax.Array, policy: StreamingPolicy) -> KVCache:
  """Adds one token (k, v: (batch, 1, kv_heads, head_dim)); when full, evicts slot ``n_sink`` (the oldest recent)."""
  if k.shape[1] != 1 or v.shape[1] != 1:
    raise ValueError(f"insert takes one token at a time; got k {tuple(k.shape)}, v {tuple(v.shape)}")
  cap, s = policy.capacity, policy.n_sink
  full = cache.length >= cap
  pos = jnp.asarray(position, jnp.int32).reshape(1)

  def shifted(buf, new):
    return jnp.concatenate([buf[:, :s], buf[:, s + 1:], new.astype(buf.dtype)], axis=1)

  def appended(buf, new):
    return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), jnp.minimum(cache.length, cap - 1), 1)

  keys = jnp.where(full, shifted(cache.keys, k), appended(cache.keys, k))
  values = jnp.where(full, shifted(cache.values, v), appended(cache.values, v))
  positions = jnp.where(full, jnp.concatenate([cache.positions[:s], cache.positions[s + 1:], pos]),
                        jax.lax.dynamic_update_slice(cache.positions, pos, (jnp.minimum(cache.length, cap - 1),)))
  return KVCache(keys, values, positions, jnp.minimum(cache.length + 1, cap))


def rope_positions(cache: KVCache, policy: StreamingPolicy) -> tuple[jax.Array, jax.Array]:
  """(key positions (capacity,), query position ()) for the newest token, which sits in slot ``length - 1``."""
  if policy.pos_shift:
    return jnp.arange(cache.keys.shape[1]), cache.length - 1
  return cache.positions, cache.positions[cache.length - 1]

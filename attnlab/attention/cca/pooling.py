"""CCA globality pooling: groups of g tokens -> one core key/value each (Chen et al., ICML 2025, §3.1).

Group p (0-based) holds tokens [p g, (p+1) g) (aligned to the sequence start). Its core token is

    w_pj = softmax_j(q_{pg+g-1} . k_{pg+j} / sqrt(d)),   k^c_p = sum_j w_pj k_{pg+j},   v^c_p = sum_j w_pj v_{pg+j}

(the query of the group's LAST token weighs its keys; per query head, so with GQA the core keys have one copy per
query head, like the authors' code after ``repeat_kv``). Keys are pooled after RoPE and are never re-rotated.
The query at 0-based position t sees the core tokens p < c(t) = max(0, floor((t + 1 - s) / g)), i.e. the groups
that end at least s tokens before it, and the raw tokens [c(t) g, t] (the locality window, s..s+g-1 tokens).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def check_cca_params(group_size: int, window_size: int) -> None:
  """Raises ValueError unless g >= 1, s >= 0 and s % g == 0."""
  if group_size < 1:
    raise ValueError(f"CCA group_size must be >= 1; got {group_size}")
  if window_size < 0:
    raise ValueError(f"CCA window_size must be >= 0; got {window_size}")
  if window_size % group_size:
    raise ValueError(
        f"CCA needs window_size % group_size == 0 (the locality window must hold whole groups; the authors' kernel "
        f"masks disagree with their dense masks otherwise); got window_size={window_size}, group_size={group_size}")


def visible_core_count(t: jax.Array, group_size: int, window_size: int) -> jax.Array:
  """c(t) = max(0, floor((t + 1 - s) / g)): core tokens visible to the query at 0-based position t."""
  return jnp.maximum((t + 1 - window_size) // group_size, 0)


def split_heads(x: jax.Array, kv_heads: int) -> jax.Array:
  """(B, L, H, d) -> (B, L, Hkv, H // Hkv, d): query head h reads kv head h // (H // Hkv)."""
  b, n, h, d = x.shape
  return x.reshape(b, n, kv_heads, h // kv_heads, d)


def pooling_weights(q: jax.Array, k: jax.Array, group_size: int) -> jax.Array:
  """Pooling weights w (B, L // g, Hkv, G, g), float32, of every full group."""
  g = group_size
  b, n, h, d = q.shape
  kv_heads, nc = k.shape[2], n // g
  q_last = split_heads(q[:, g - 1:nc * g:g].astype(jnp.float32), kv_heads)
  kg = k[:, :nc * g].astype(jnp.float32).reshape(b, nc, g, kv_heads, d)
  logits = jnp.einsum("bchgd,bcjhd->bchgj", q_last, kg) / math.sqrt(d)
  return jax.nn.softmax(logits, axis=-1)


def pool_core(q: jax.Array, k: jax.Array, v: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
  """Core keys and values (B, L // g, Hkv, G, d), float32, of every full group of the sequence.

  Args:
    q: (B, L, H, d) queries (after RoPE). k, v: (B, L, Hkv, d).
    group_size: g.
  """
  g = group_size
  b, n, kv_heads, d = k.shape
  nc = n // g
  w = pooling_weights(q, k, g)
  kg = k[:, :nc * g].astype(jnp.float32).reshape(b, nc, g, kv_heads, d)
  vg = v[:, :nc * g].astype(jnp.float32).reshape(b, nc, g, kv_heads, v.shape[-1])
  return jnp.einsum("bchgj,bcjhd->bchgd", w, kg), jnp.einsum("bchgj,bcjhd->bchgd", w, vg)

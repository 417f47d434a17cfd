"""Recurrent lightning attention (``lax.scan`` over tokens): the decoding form, constant cost per token.

    KV_t = lambda KV_{t-1} + k_t^T v_t,    o_t = q_t KV_t          (KV in R^{d x e} per head)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.attention.lightning.common import check_inputs


def lightning_step(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, state: jax.Array, *,
                   scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """One token: q, k (batch, heads, d), v (batch, heads, e), state (batch, heads, d, e) -> (o, new state)."""
  lam = jnp.exp(-jnp.asarray(log_decay, jnp.float32))[None, :, None, None]
  state = lam * state + jnp.einsum("bhd,bhe->bhde", k.astype(jnp.float32), v.astype(jnp.float32))
  o = jnp.einsum("bhd,bhde->bhe", q.astype(jnp.float32) * scale, state)
  return o.astype(v.dtype), state


def lightning_recurrent(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, *, scale: float = 1.0,
                        initial_state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Token-by-token form. Shapes as :func:`lightning_naive`; returns ``(out, final float32 state)``."""
  check_inputs(q, k, v, log_decay, initial_state)
  b, _, h, d = q.shape
  e = v.shape[-1]
  state = jnp.zeros((b, h, d, e), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)

  def step(st, qkv):
    o, st = lightning_step(*qkv, log_decay, st, scale=scale)
    return st, o

  state, o = jax.lax.scan(step, state, tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v)))
  return jnp.swapaxes(o, 0, 1), state

"""Recurrent lightning attention (``lax.scan`` over tokens): the decoding form, constant cost per token.

    KV_t = lambda KV_{t-1} + k_t^T v_t,    o_t = q_t KV_t          (KV in R^{d x e} per head)

With segment_ids, ``KV_{t-1}`` is dropped where the id changes (a new packed document starts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops.lightning.common import check_inputs


def lightning_step(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, state: jax.Array, *,
                   scale: float = 1.0, reset: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """One token: q, k (batch, heads, d), v (batch, heads, e), state (batch, heads, d, e) -> (o, new state).
  ``reset``: optional (batch,) bool, drop the old state (the token starts a new document)."""
  lam = jnp.exp(-jnp.asarray(log_decay, jnp.float32))[None, :, None, None]
  if reset is not None:
    lam = jnp.where(reset[:, None, None, None], 0.0, lam)
  state = lam * state + jnp.einsum("bhd,bhe->bhde", k.astype(jnp.float32), v.astype(jnp.float32))
  o = jnp.einsum("bhd,bhde->bhe", q.astype(jnp.float32) * scale, state)
  return o.astype(v.dtype), state


def lightning_recurrent(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, *, scale: float = 1.0,
                        initial_state: jax.Array | None = None,
                        segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Token-by-token form. Shapes as :func:`lightning_naive`; returns ``(out, final float32 state)``."""
  check_inputs(q, k, v, log_decay, initial_state, segment_ids)
  b, _, h, d = q.shape
  e = v.shape[-1]
  state = jnp.zeros((b, h, d, e), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)

  seg = jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
  reset = jnp.concatenate([jnp.zeros_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)

  def step(st, xs):
    *qkv, r = xs
    o, st = lightning_step(*qkv, log_decay, st, scale=scale, reset=r)
    return st, o

  state, o = jax.lax.scan(step, state, tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v, reset)))
  return jnp.swapaxes(o, 0, 1), state

"""Input checks and decay powers shared by the lightning-attention forms.

Packed sequences: ``segment_ids`` (batch, seq) must number CONTIGUOUS runs (as sequence packing produces); a
token attends only to earlier tokens of its own run, i.e. the state is reset where the id changes. The state given
as ``initial_state`` belongs to the run of the first token.

Every decay factor is ``lambda^n = exp(-s n)`` with an integer ``n >= 0`` and ``s >= 0``, so it lies in
``(0, 1]``: no form ever builds ``lambda^i * lambda^(-j)`` (which overflows for long sequences).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array,
                 initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None) -> None:
  """q, k: (batch, seq, heads, d); v: (batch, seq, heads, e); log_decay: (heads,); state: (batch, heads, d, e);
  segment_ids: (batch, seq) ints."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 (batch, seq, heads, head_dim); got shape {tuple(x.shape)}")
  if q.shape != k.shape:
    raise ValueError(f"q and k must have the same shape; got q {q.shape}, k {k.shape}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must agree with q in (batch, seq, heads); got q {q.shape}, v {v.shape}")
  if jnp.shape(log_decay) != (q.shape[2],):
    raise ValueError(f"log_decay must have shape (heads,) = ({q.shape[2]},); got {jnp.shape(log_decay)}")
  if initial_state is not None:
    want = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    if initial_state.shape != want:
      raise ValueError(f"initial_state must have shape (batch, heads, d, e) = {want}; got {initial_state.shape}")
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f"segment_ids must have shape (batch, seq) = {q.shape[:2]}; got {segment_ids.shape}")


def decay_pow(log_decay: jax.Array, n: jax.Array) -> jax.Array:
  """``lambda^n = exp(-s n)`` for integer ``n >= 0``; shape ``n.shape + (heads,)``, float32."""
  return jnp.exp(-log_decay.astype(jnp.float32) * n.astype(jnp.float32)[..., None])


def intra_decay(log_decay: jax.Array, size: int) -> jax.Array:
  """(heads, size, size) causal decay mask ``D_ij = lambda^(i-j)`` for ``i >= j``, else 0."""
  i = jnp.arange(size)[:, None]
  j = jnp.arange(size)[None, :]
  d = decay_pow(log_decay, jnp.maximum(i - j, 0))  # (size, size, heads)
  return jnp.where((i >= j)[..., None], d, 0.0).transpose(2, 0, 1)


def same_segment(segment_ids: jax.Array) -> jax.Array:
  """(batch, seq, seq) bool: ``seg_i == seg_j`` (for contiguous runs and j <= i: no segment start in (j, i])."""
  return segment_ids[:, :, None] == segment_ids[:, None, :]

"""Naive (dense, quadratic) lightning attention: the readable form the chunked and recurrent forms must match.

    O = ((Q K^T) ⊙ M) V,   M_ij = lambda_h^(i-j) for i >= j, else 0     (Qin et al. 2024, Lightning Attention-2)

No softmax, no normaliser; ``scale`` multiplies Q (1 for TransNormerLLM, 1/sqrt(d) in fla).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops.lightning.common import check_inputs, intra_decay, same_segment


def lightning_weights(q: jax.Array, k: jax.Array, log_decay: jax.Array, *, scale: float = 1.0,
                      segment_ids: jax.Array | None = None) -> jax.Array:
  """(batch, heads, q, k) float32 weights ``(Q K^T) ⊙ M`` (unnormalised; for analysis)."""
  s = jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32) * scale, k.astype(jnp.float32))
  s = s * intra_decay(log_decay, q.shape[1])[None]
  return s if segment_ids is None else s * same_segment(segment_ids)[:, None]


def lightning_naive(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, *, scale: float = 1.0,
                    segment_ids: jax.Array | None = None) -> jax.Array:
  """q, k: (batch, seq, heads, d), v: (batch, seq, heads, e), log_decay: (heads,) ``s_h = -log lambda_h >= 0``,
  segment_ids: optional (batch, seq) contiguous runs (packing; see :mod:`.common`).

  Returns (batch, seq, heads, e) in v's dtype; O(n^2) time and memory, float32 accumulation.
  """
  check_inputs(q, k, v, log_decay, segment_ids=segment_ids)
  w = lightning_weights(q, k, log_decay, scale=scale, segment_ids=segment_ids)
  return jnp.einsum("bhij,bjhe->bihe", w, v.astype(jnp.float32)).astype(v.dtype)

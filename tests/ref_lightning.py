"""Float64 dense reference of lightning attention, independent of attnlab's decay helpers:

    o_i = sum_{j <= i} lambda_h^(i-j) (scale q_i . k_j) v_j

Call inside ``with jax.enable_x64(True):`` with float64 inputs.
"""

import jax.numpy as jnp
import numpy as np


def decay_mask(lam: np.ndarray, n: int) -> np.ndarray:
  """(heads, n, n) float64: lambda_h ** (i - j) where i >= j, else 0 (numpy, exact powers)."""
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  powers = np.asarray(lam, np.float64)[:, None, None] ** np.where(i >= j, i - j, 0)
  return np.where(i >= j, powers, 0.0)


def lightning_ref(q, k, v, lam, scale=1.0, segment_ids=None):
  """q, k: (b, n, h, d), v: (b, n, h, e) float64; lam: (h,) decays in (0, 1]; segment_ids: (b, n) runs."""
  s = jnp.einsum("bihd,bjhd->bhij", q * scale, k) * decay_mask(lam, q.shape[1])
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    s = s * (seg[:, None, :, None] == seg[:, None, None, :])
  return jnp.einsum("bhij,bjhe->bihe", s, v)


def linear_attention_cumsum(q, k, v):
  """lambda = 1: o_i = q_i . sum_{j <= i} k_j^T v_j (prefix sums of outer products)."""
  return jnp.einsum("bihd,bihde->bihe", q, jnp.cumsum(jnp.einsum("bjhd,bjhe->bjhde", k, v), axis=1))

"""Online mini-batch k-means of the Routing Transformer (Roy et al., TACL 2021, "Efficient Content-Based Sparse
Attention with Routing Transformers"), in the EMA form of the google-research reference.

Routing features are layer-normalised without scale/bias, ``x̂ = LN(x)`` (so ``‖x̂‖ = √d``). With per-head
centroids ``μ ∈ R^{H × k × d}`` the nearest centroid is ``c(t) = argmax_c x̂_t·μ_c``. One training step updates

    n_c = Σ_{b,t} [c(t) = c],          S_c = Σ_{b,t: c(t)=c} x̂_t
    N_c ← λ N_c + (1 − λ) n_c,         Σ_c ← λ Σ_c + (1 − λ) S_c                      (λ = decay = 0.999)
    Ñ_c = (N_c + ε) / (Σ_c' N_c' + k ε) · Σ_c' N_c'                                   (Laplace smoothing)
    μ_c = Σ_c / Ñ_c

and the commitment loss is ``β · mean((x̂ − sg(μ_{c(t)}))²)`` (β = 1e−4; no gradient into μ).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Layer norm over the last axis without scale or bias, in float32: zero mean, unit variance."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def _check_centroids(r: jax.Array, centroids: jax.Array) -> None:
  if r.ndim != 4:
    raise ValueError(f"routing features must be (batch, seq, heads, dim); got shape {tuple(r.shape)}")
  if centroids.ndim != 3 or centroids.shape[0] != r.shape[2] or centroids.shape[2] != r.shape[3]:
    raise ValueError(f"centroids must be (heads, clusters, dim) = ({r.shape[2]}, k, {r.shape[3]}); "
                     f"got shape {tuple(centroids.shape)}")


def centroid_scores(r: jax.Array, centroids: jax.Array) -> jax.Array:
  """Similarities ``x̂_t·μ_c``: r (batch, seq, heads, d), centroids (heads, k, d) -> (batch, heads, k, seq)."""
  _check_centroids(r, centroids)
  return jnp.einsum("bnhd,hkd->bhkn", r.astype(jnp.float32), centroids.astype(jnp.float32))


def nearest_centroid(r: jax.Array, centroids: jax.Array) -> jax.Array:
  """``c(t) = argmax_c x̂_t·μ_c`` as int32 (batch, seq, heads)."""
  return jnp.argmax(centroid_scores(r, centroids), axis=2).transpose(0, 2, 1).astype(jnp.int32)


def commitment_loss(r: jax.Array, centroids: jax.Array, cluster: jax.Array, beta: float) -> jax.Array:
  """``β · mean((x̂ − sg(μ_{c(t)}))²)`` over batch, positions, heads and features."""
  heads = jnp.arange(r.shape[2])[None, None, :]
  mu = jax.lax.stop_gradient(centroids.astype(jnp.float32))[heads, cluster]  # (batch, seq, heads, d)
  return beta * jnp.mean(jnp.square(r.astype(jnp.float32) - mu))


def kmeans_ema_update(ema_count: jax.Array, ema_sum: jax.Array, r: jax.Array, cluster: jax.Array, *,
                      decay: float, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One EMA k-means step (module docstring). Gradients are stopped.

  Args:
    ema_count: (heads, k) running counts N. ema_sum: (heads, k, d) running sums Σ.
    r: (batch, seq, heads, d) routing features x̂. cluster: (batch, seq, heads) nearest-centroid ids.
    decay: λ. eps: Laplace smoothing ε.

  Returns:
    (new_count, new_sum, new_centroids), the raw EMA count and sum and the smoothed means.
  """
  k = ema_count.shape[-1]
  r = jax.lax.stop_gradient(r.astype(jnp.float32))
  onehot = jax.nn.one_hot(cluster, k, dtype=jnp.float32)  # (batch, seq, heads, k)
  count = decay * ema_count + (1.0 - decay) * onehot.sum((0, 1))
  total = decay * ema_sum + (1.0 - decay) * jnp.einsum("bnhk,bnhd->hkd", onehot, r)
  n = count.sum(-1, keepdims=True)
  smoothed = (count + eps) / (n + k * eps) * n
  return count, total, total / smoothed[..., None]

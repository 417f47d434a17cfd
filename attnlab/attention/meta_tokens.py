"""Meta-attention over learned meta tokens (Shah, Gupta, Ramji, Chaudhari 2025, "Language Modeling with Learned
Meta-Tokens", arXiv 2509.16278).

RECONSTRUCTION: the paper has no public code and its body was not available.
Verified: meta tokens are injected during pre-training and a dedicated meta-attention runs in addition to causal
multi-head attention; a paper-notes summary says it "flows exclusively between meta-tokens". Implemented here:

    MetaAttn(x)_i = Σ_j softmax_j(q_i·k_j/√d + M_ij) v_j,   M_ij = 0 if allowed(i, j) else -inf
    allowed(i, j) = j <= i ∧ meta(j) ∧ (meta(i) if mode == "meta_only" else True)   (∧ same segment)

``mode="meta_only"`` is the meta↔meta reading; ``mode="all"`` lets every query read the meta keys. A row with
no allowed key returns 0 (with finite gradients).

Fast path: gather the (at most ``capacity``) meta positions, attend over them (O(m²·d) for ``meta_only``,
O(n·m·d) for ``all``), scatter back. With ``capacity=None`` all meta tokens are kept; with a smaller capacity
the meta tokens after the first ``capacity`` of a row are ignored by this path (``dropped`` counts them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.attention.dispatch import attend

MODES = ("meta_only", "all")


def meta_attention_mask(is_meta: jax.Array, mode: str, segment_ids: jax.Array | None = None) -> jax.Array:
  """Dense (batch, 1, n, n) boolean mask ``allowed(i, j)`` (for analysis and references)."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
  n = is_meta.shape[1]
  mask = jnp.tril(jnp.ones((n, n), bool))[None] & is_meta[:, None, :]
  if mode == "meta_only":
    mask = mask & is_meta[:, :, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask[:, None]


def meta_attention(q: jax.Array, k: jax.Array, v: jax.Array, is_meta: jax.Array, *, mode: str = "meta_only",
                   capacity: int | None = None, scale: float | None = None,
                   segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Meta-attention by gathering meta positions.

  Args:
    q: (batch, n, num_heads, head_dim); k, v: (batch, n, num_kv_heads, head_dim) (GQA allowed).
    is_meta: (batch, n) bool.
    mode: "meta_only" (meta queries read meta keys) or "all" (every query reads meta keys).
    capacity: static bound on meta tokens per row (None: n).
    scale: logit scale, default 1/sqrt(head_dim).
    segment_ids: optional (batch, n) packing ids.

  Returns:
    ``(out, dropped)``: (batch, n, num_heads, head_dim) in ``q.dtype`` (0 where no key is allowed) and the
    (batch,) number of meta tokens beyond ``capacity``.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
  b, n = q.shape[:2]
  if is_meta.shape != (b, n):
    raise ValueError(f"is_meta must be (batch, seq) = {(b, n)}; got {tuple(is_meta.shape)}")
  cap = n if capacity is None else capacity
  if not 1 <= cap <= n:
    raise ValueError(f"capacity must be in [1, seq={n}]; got {capacity}")
  idx = jax.vmap(lambda m: jnp.nonzero(m, size=cap, fill_value=n)[0])(is_meta)  # (b, cap), ascending
  valid = idx < n
  safe = jnp.minimum(idx, n - 1)
  take = lambda x: jnp.take_along_axis(x, safe.reshape(b, cap, *([1] * (x.ndim - 2))), axis=1)
  k_m, v_m = take(k), take(v)
  key_ok = valid[:, None, :]
  if mode == "meta_only":
    mask = key_ok & valid[:, :, None] & (idx[:, None, :] <= idx[:, :, None])
    if segment_ids is not None:
      seg = take(segment_ids)
      mask = mask & (seg[:, :, None] == seg[:, None, :])
    o_m = attend(take(q), k_m, v_m, causal=False, scale=scale, mask=mask[:, None])
    out = jnp.zeros_like(q).at[jnp.arange(b)[:, None], idx].set(o_m, mode="drop")
  else:
    mask = key_ok & (idx[:, None, :] <= jnp.arange(n)[None, :, None])
    if segment_ids is not None:
      mask = mask & (segment_ids[:, :, None] == take(segment_ids)[:, None, :])
    out = attend(q, k_m, v_m, causal=False, scale=scale, mask=mask[:, None])
  dropped = jnp.maximum(jnp.sum(is_meta, axis=1) - cap, 0)
  return out, dropped

"""Registry of attention score functions.

A score function turns the (masked) logits ``s_ij = scale * q_i.k_j + bias_ij`` of one attention call into weights
``p_ij``; the output is ``o_i = sum_j p_ij v_j``. Each score function lives in its own file and registers itself
with :func:`register_score`; the dense XLA path (:func:`attnlab.attend`) and the Pallas kernels look it up by name.

Contract every score function honours:
  * masked entries (``mask == False``) get weight exactly 0;
  * a row with no visible key gets all-zero weights (never NaN), with finite gradients.

A score function may also provide :class:`Blockwise` hooks: the same math written one key block at a time, which
is what a flash kernel (``kernels_pallas.flash``) calls. The kernel is generic; the score function is its parameter.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class ScoreContext(NamedTuple):
  """Static facts about one attention call that a score function may need."""

  q_len: int
  kv_len: int
  head_dim: int


class Blockwise:
  """A score function evaluated one key block at a time, without the full row (flash attention).

  Per query row ``i`` a kernel carries a shift ``m_i``, a denominator sum ``l_i`` and ``acc_i = sum_j u_ij v_j``
  over visible keys, with ``u_ij, d_ij = block(s_ij, m_i, n_i)`` (numerator weight and denominator term, both
  relative to the shift). When ``online`` the shift is a running max (``m <- max(m, max_j s_ij)``) and
  ``l``/``acc`` are rescaled by ``exp(m_old - m_new)`` (softmax, softpick); otherwise ``m = 0`` throughout
  (sigmoid, softplus, relu: no statistics, or an l1 row sum, FlashSigmoid-style). At the end
  ``o_i = acc_i / D_i`` with ``D_i = denominator(l_i, m_i, n_i)``, and the kernel keeps the residual
  ``r_i = m_i + log D_i`` (for softmax: the row log-sum-exp, sink included). The backward pass recomputes
  ``p_ij = probs(s_ij, r_i, n_i)`` and ``ds_ij = dlogits(s_ij, r_i, dp_ij, delta_i, n_i)`` from ``r`` with
  ``dp_ij = do_i . v_j`` and ``delta_i = do_i . o_i`` (minus the cotangent of ``r_i``).

  ``n_i`` is the number of keys visible to row ``i`` (only computed when ``needs_count``); all methods act on
  broadcastable float32 arrays (rows (bq, 1), blocks (bq, bk)) and the kernel zeroes masked entries itself.
  Subclasses are frozen dataclasses (hashable: they are static arguments of the kernel).
  """

  online: bool = False  # running-max shift (else m = 0)
  uses_sum: bool = True  # carries l (else d is ignored and l stays 0)
  needs_count: bool = False  # needs n_i, the visible-key count of each row
  init_shift: float = 0.0  # m before the first block (online only; the kernel uses its mask value for -inf)

  def block(self, s, m, n):
    """(u, d): numerator weights and denominator terms of one block, relative to the shift m."""
    raise NotImplementedError

  def denominator(self, l, m, n):
    """D_i from the carried sum l_i (relative to the shift m_i); o_i = acc_i / D_i."""
    raise NotImplementedError

  def probs(self, s, r, n):
    """p_ij recomputed from the residual r_i = m_i + log D_i."""
    raise NotImplementedError

  def dlogits(self, s, r, dp, delta, n):
    """dL/ds_ij given dp_ij = dL/dp_ij and delta_i = sum_j p_ij dp_ij."""
    raise NotImplementedError


# blockwise(ctx, **params) -> Blockwise: the kernel hooks with the score's parameters resolved.
BlockwiseFn = Callable[..., Blockwise]
# weights(s, mask, *, sink_logits, ctx, **params) -> p, all of shape (..., q_len, kv_len), float32.
WeightsFn = Callable[..., jax.Array]
# prepare(q, k, scale, ctx, **params) -> (q, k, scale): optional transform before the logits (e.g. l2-normalise).
PrepareFn = Callable[..., tuple[jax.Array, jax.Array, float]]


@dataclasses.dataclass(frozen=True)
class ScoreFunction:
  name: str
  weights: WeightsFn
  params: tuple[str, ...] = ()
  supports_sink_logits: bool = False
  prepare: PrepareFn | None = None
  doc: str = ""
  blockwise: BlockwiseFn | None = None  # flash-kernel hooks; None: the score runs only on the dense path

  def check_params(self, params: dict[str, Any]) -> None:
    unknown = sorted(set(params) - set(self.params))
    if unknown:
      raise TypeError(
          f"score function {self.name!r} got unknown parameter(s) {unknown}; it accepts {list(self.params) or 'none'}"
      )

  def prepare_inputs(self, q, k, scale, ctx: ScoreContext, params: dict[str, Any]):
    """(q, k, scale) as the logits use them: the score's own q/k transform (``prepare``, e.g. softplus'
    l2-normalisation), then the default scale ``1/sqrt(head_dim)`` where neither the caller nor the score set one."""
    if self.prepare is not None:
      q, k, scale = self.prepare(q, k, scale, ctx, **params)
    return q, k, 1.0 / math.sqrt(ctx.head_dim) if scale is None else scale

  def check_sink_logits(self, sink_logits, num_heads: int) -> jax.Array | None:
    """``sink_logits`` as a float32 (num_heads,) array (None passes through); clear errors otherwise."""
    if sink_logits is None:
      return None
    if not self.supports_sink_logits:
      raise ValueError(f"score function {self.name!r} does not support sink_logits")
    sink_logits = jnp.asarray(sink_logits, jnp.float32)
    if sink_logits.shape != (num_heads,):
      raise ValueError(f"sink_logits must have shape (num_heads,) = ({num_heads},); got {tuple(sink_logits.shape)}")
    return sink_logits


_REGISTRY: dict[str, ScoreFunction] = {}


def register_score(name: str, *, params: tuple[str, ...] = (), supports_sink_logits: bool = False,
                   prepare: PrepareFn | None = None, blockwise: BlockwiseFn | None = None):
  """Decorator: registers ``weights`` (and optional flash-kernel hooks ``blockwise``) under ``name``."""

  def wrap(weights: WeightsFn) -> WeightsFn:
    if name in _REGISTRY:
      raise ValueError(f"score function {name!r} is already registered")
    _REGISTRY[name] = ScoreFunction(name, weights, tuple(params), supports_sink_logits, prepare,
                                    (weights.__doc__ or "").strip(), blockwise)
    return weights

  return wrap


def get_score(name: str) -> ScoreFunction:
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown score function {name!r}; available: {available_scores()}") from None


def available_scores() -> list[str]:
  return sorted(_REGISTRY)


def visible_count(mask: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Number of visible keys per query row, shape (..., q_len, 1)."""
  return jnp.sum(mask, axis=-1, keepdims=True, dtype=dtype)


def safe_row_normalize(w: jax.Array, eps: float = 0.0) -> jax.Array:
  """``w / (sum_j w + eps)`` with all-zero rows mapped to 0 (no 0/0)."""
  denom = jnp.sum(w, axis=-1, keepdims=True) + eps
  return w / jnp.where(denom > 0, denom, 1.0)

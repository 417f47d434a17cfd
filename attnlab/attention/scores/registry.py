"""Registry of attention score functions.

A score function turns the (masked) logits ``s_ij = scale * q_i.k_j + bias_ij`` of one attention call into weights
``p_ij``; the output is ``o_i = sum_j p_ij v_j``. Each score function lives in its own file and registers itself
with :func:`register_score`; the dense XLA path (:func:`attnlab.attend`) and the Pallas kernels look it up by name.

Contract every score function honours:
  * masked entries (``mask == False``) get weight exactly 0;
  * a row with no visible key gets all-zero weights (never NaN), with finite gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class ScoreContext(NamedTuple):
  """Static facts about one attention call that a score function may need."""

  q_len: int
  kv_len: int
  head_dim: int


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

  def check_params(self, params: dict[str, Any]) -> None:
    unknown = sorted(set(params) - set(self.params))
    if unknown:
      raise TypeError(
          f"score function {self.name!r} got unknown parameter(s) {unknown}; it accepts {list(self.params) or 'none'}"
      )


_REGISTRY: dict[str, ScoreFunction] = {}


def register_score(name: str, *, params: tuple[str, ...] = (), supports_sink_logits: bool = False,
                   prepare: PrepareFn | None = None):
  """Decorator: registers ``weights`` under ``name``."""

  def wrap(weights: WeightsFn) -> WeightsFn:
    if name in _REGISTRY:
      raise ValueError(f"score function {name!r} is already registered")
    _REGISTRY[name] = ScoreFunction(name, weights, tuple(params), supports_sink_logits, prepare,
                                    (weights.__doc__ or "").strip())
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

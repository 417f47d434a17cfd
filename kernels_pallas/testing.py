"""Shared conformance helpers for attnlab's Pallas kernels (a tokamax-style test base every backend reuses).

A backend's test file builds :class:`Case` grids and calls :func:`check_case` with its kernel (e.g. the GPU kernel
with ``interpret=True``, the TPU kernel under the TPU simulator) and a float64 naive reference. One jitted
``value_and_grad`` per case computes the forward output, the residual and the gradients of a random projection of
both, so every case checks forward and backward (q, k, v and sink logits) for one compile.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# (atol, rtol) per dtype; errors are measured against a float64 reference on the same (rounded) inputs.
# bf16: inputs, the p @ v / ds @ k operands and the output are bf16 (8 mantissa bits, ~4e-3 relative per rounding).
TOLERANCES = {
    "float32": {"fwd": (2e-5, 2e-5), "grad": (1e-4, 1e-4)},
    "bfloat16": {"fwd": (3e-2, 3e-2), "grad": (8e-2, 5e-2)},
}


@dataclasses.dataclass(frozen=True)
class Case:
  """One conformance case: shapes, mask features, score function and dtype."""

  name: str
  score: str = "softmax"
  params: tuple = ()
  causal: bool = True
  batch: int = 2
  q_len: int = 32
  kv_len: int = 32
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 16
  block_q: int = 16
  block_kv: int = 16
  segments: bool = False
  sinks: tuple[float, ...] | None = None
  window: int | None = None  # sliding window W (keys p - W < j <= p)
  dtype: str = "float32"
  residual: bool = True  # also differentiate through the returned residual r

  @property
  def kwargs(self) -> dict[str, Any]:
    kw = dict(score=self.score, causal=self.causal, **dict(self.params))
    if self.window is not None:
      kw["window"] = self.window
    return kw


def random_segments(key, batch: int, length: int, max_segments: int = 3) -> jax.Array:
  """Packed (sorted) segment ids with 1..max_segments segments per row, every segment non-empty."""
  cuts = jax.random.randint(key, (batch, max_segments - 1), 1, length)
  return jnp.sum(jnp.arange(length)[None, :, None] >= cuts[:, None, :], axis=-1).astype(jnp.int32)


def make_inputs(case: Case, seed: int = 0) -> dict[str, Any]:
  kq, kk, kv, ks, kw, kr = jax.random.split(jax.random.key(seed), 6)
  dtype = jnp.dtype(case.dtype)
  inputs = dict(
      q=jax.random.normal(kq, (case.batch, case.q_len, case.heads, case.head_dim)).astype(dtype),
      k=jax.random.normal(kk, (case.batch, case.kv_len, case.kv_heads, case.head_dim)).astype(dtype),
      v=jax.random.normal(kv, (case.batch, case.kv_len, case.kv_heads, case.head_dim)).astype(dtype),
      sink_logits=None if case.sinks is None else jnp.asarray(case.sinks, jnp.float32),
      segment_ids=None,
      w_out=jax.random.normal(kw, (case.batch, case.q_len, case.heads, case.head_dim), jnp.float32),
      w_res=jax.random.normal(kr, (case.batch, case.heads, case.q_len), jnp.float32),
  )
  if case.segments:
    if case.q_len != case.kv_len:
      raise ValueError("segment cases need q_len == kv_len")
    inputs["segment_ids"] = random_segments(ks, case.batch, case.q_len)
  return inputs


def _loss_and_grads(fn: Callable, case: Case, inputs: dict, with_residual: bool):
  """(o, r, grads) of L = sum(o * w_out) + sum(r * w_res) w.r.t. q, k, v (and sink logits)."""
  diff = ["q", "k", "v"] + (["sink_logits"] if inputs["sink_logits"] is not None else [])

  def loss(args):
    o, r = fn(args["q"], args["k"], args["v"], segment_ids=inputs["segment_ids"],
              sink_logits=args.get("sink_logits"), **case.kwargs)
    value = jnp.sum(o.astype(inputs["w_out"].dtype) * inputs["w_out"])
    if with_residual:
      value = value + jnp.sum(r * inputs["w_res"])
    return value, (o, r)

  return loss, {name: inputs[name] for name in diff}


def assert_close(name: str, got, want, atol: float, rtol: float) -> None:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if got.shape != want.shape:
    raise AssertionError(f"{name}: shape {got.shape} != {want.shape}")
  if not np.all(np.isfinite(got)):
    raise AssertionError(f"{name}: non-finite values")
  err = np.abs(got - want)
  bound = atol + rtol * np.abs(want)
  if np.any(err > bound):
    i = np.unravel_index(np.argmax(err - bound), err.shape)
    raise AssertionError(f"{name}: max |err| {err.max():.3g} (worst at {i}: got {got[i]:.6g}, want {want[i]:.6g}; "
                         f"atol {atol}, rtol {rtol})")


def check_case(kernel: Callable, reference: Callable, case: Case, seed: int = 0) -> dict[str, float]:
  """Runs ``kernel`` (float32/bf16) and ``reference`` (float64) on ``case``; asserts forward, residual, grads.

  Both callables: ``fn(q, k, v, *, segment_ids, sink_logits, score, causal, **params) -> (o, r)`` with
  ``r`` of shape (batch, heads, q_len). Returns the max abs errors (for reporting).
  """
  inputs = make_inputs(case, seed)
  loss, args = _loss_and_grads(kernel, case, inputs, case.residual)
  (_, (o, r)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(args)
  with jax.enable_x64(True):
    inputs64 = {n: (None if x is None else jnp.asarray(np.asarray(x, np.float64)) if n not in ("segment_ids",)
                    else x) for n, x in inputs.items()}
    loss64, args64 = _loss_and_grads(reference, case, inputs64, case.residual)
    (_, (o64, r64)), grads64 = jax.value_and_grad(loss64, has_aux=True)(args64)
    o64, r64 = np.asarray(o64), np.asarray(r64)
    grads64 = {n: np.asarray(g) for n, g in grads64.items()}
  tol = TOLERANCES[case.dtype]
  errors = {}
  assert_close(f"{case.name}: o", o, o64, *tol["fwd"])
  assert_close(f"{case.name}: r", r, r64, *tol["fwd"])
  errors["o"], errors["r"] = float(np.abs(np.asarray(o, np.float64) - o64).max()), float(
      np.abs(np.asarray(r, np.float64) - r64).max())
  for name, g in grads.items():
    # gradients are compared relative to their scale (they sum over many terms)
    scale = max(1.0, float(np.abs(grads64[name]).max()))
    atol, rtol = tol["grad"]
    assert_close(f"{case.name}: d{name}", np.asarray(g, np.float64) / scale, grads64[name] / scale, atol, rtol)
    errors["d" + name] = float(np.abs(np.asarray(g, np.float64) - grads64[name]).max())
  return errors

"""Sliding-window attention, attend(..., window=W): every backend (dense, blocked, the GPU-style kernel in interpret
mode) against the naive float64 reference, forward and gradients (q, k, v, sink logits), with GQA, segment ids,
sinks and end-aligned decode; plus the band itself and bad values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnlab
from attnlab.ops.masks import position_mask
from tests.reference import reference_attend, relative_error, with_x64

SINKS = np.array([30.0, -30.0, 4.0, -2.0], np.float32)


def _inputs(q_len, kv_len, seed=0, heads=4, kv_heads=2, d=8, batch=2):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, q_len, heads, d)).astype(np.float32)
  k = rng.normal(size=(batch, kv_len, kv_heads, d)).astype(np.float32)
  v = rng.normal(size=(batch, kv_len, kv_heads, d)).astype(np.float32)
  ct = rng.normal(size=(batch, q_len, heads, d)).astype(np.float32)
  return q, k, v, ct


def test_band_is_end_aligned():
  m = np.asarray(position_mask(3, 6, causal=True, window=2))
  # queries sit at positions 3, 4, 5 and see themselves and one key before
  np.testing.assert_array_equal(m, [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]])


# (q_len, kv_len, window, segments, score, params)
CASES = [
    (12, 12, 4, True, "softmax", {}),
    (5, 16, 6, False, "softmax", {}),
    (1, 16, 7, False, "softmax", {}),
    (12, 12, 3, True, "relu", {}),
    (10, 10, 4, False, "sigmoid", {"normalize": True}),
]


@pytest.mark.parametrize("impl", ["xla", "blocked", "pallas"])
@pytest.mark.parametrize("q_len,kv_len,window,segments,score,params", CASES,
                         ids=[f"{c[4]}_{c[0]}x{c[1]}_w{c[2]}{'_seg' if c[3] else ''}" for c in CASES])
def test_window_matches_float64_reference(impl, q_len, kv_len, window, segments, score, params):
  q, k, v, ct = _inputs(q_len, kv_len, seed=q_len * 31 + window)
  seg = None
  if segments:
    seg = np.stack([(np.arange(q_len) >= 5), (np.arange(q_len) >= 2)]).astype(np.int32)
  sinks = SINKS if score == "softmax" else None
  kw = dict(score=score, window=window, **params)

  def loss(q, k, v, s):
    out = attnlab.attend(q, k, v, segment_ids=seg, sink_logits=s, impl=impl, **kw)
    return jnp.sum(out * ct), out

  def ref_loss(q, k, v, s):
    out = reference_attend(q, k, v, segment_ids=None if seg is None else (seg, seg), sink_logits=s, **kw)
    return jnp.sum(out * ct), out

  argnums = (0, 1, 2, 3) if sinks is not None else (0, 1, 2)
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(q, k, v, sinks)
  with jax.enable_x64(True):
    args = [None if a is None else jnp.asarray(a, jnp.float64) for a in (q, k, v, sinks)]
    (_, ref), ref_grads = jax.value_and_grad(ref_loss, argnums=argnums, has_aux=True)(*args)
    ref, ref_grads = np.asarray(ref), [np.asarray(g) for g in ref_grads]
  assert relative_error(out, ref) < 2e-5, "forward"
  for i, (g, rg) in enumerate(zip(grads, ref_grads)):
    assert relative_error(g, rg) < 2e-4, f"gradient {i}"


def test_window_wider_than_sequence_is_plain_causal():
  q, k, v, _ = _inputs(9, 9)
  np.testing.assert_allclose(attnlab.attend(q, k, v, window=100), attnlab.attend(q, k, v), atol=1e-6)
  np.testing.assert_allclose(attnlab.attend(q, k, v, window=100, impl="blocked"), attnlab.attend(q, k, v),
                             atol=1e-6)


def test_keys_outside_the_window_change_nothing():
  q, k, v, _ = _inputs(12, 12)
  out = attnlab.attend(q, k, v, window=3, impl="blocked")
  v2 = v.copy()
  v2[:, :5] += 100.0  # query 8 sees keys 6..8 only
  out2 = attnlab.attend(q, k, v2, window=3, impl="blocked")
  np.testing.assert_array_equal(np.asarray(out)[:, 7:], np.asarray(out2)[:, 7:])


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_window_raises(bad):
  q, k, v, _ = _inputs(4, 4)
  with pytest.raises(ValueError, match="window must be a positive int"):
    attnlab.attend(q, k, v, window=bad)

"""Lightning attention functional forms: naive, chunked and recurrent agree with a float64 reference in forward
and gradient; decay schedules; decode state; no overflow; causality; input checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops.lightning import (alibi_slopes, lightning_chunked, lightning_naive, lightning_recurrent,
                                         lightning_step, log_decay)
from tests.ref_lightning import lightning_ref, linear_attention_cumsum

H, D, E = 3, 8, 4


def _inputs(n, b=2, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, n, H, D)) * 0.5
  k = jax.random.normal(ks[1], (b, n, H, D)) * 0.5
  v = jax.random.normal(ks[2], (b, n, H, E))
  w = jax.random.normal(ks[3], (b, n, H, E))  # random projection of the output for gradients
  return q, k, v, w


def _value_and_grads(fn, q, k, v, w):
  return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)


def _reference(q, k, v, w, s, scale=1.0):
  with jax.enable_x64(True):
    q, k, v, w = (jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v, w))
    o = lightning_ref(q, k, v, np.exp(-np.asarray(s, np.float64)), scale)
    loss, grads = _value_and_grads(lambda q, k, v: lightning_ref(q, k, v, np.exp(-np.asarray(s)), scale), q, k, v, w)
    return np.asarray(o), [np.asarray(g) for g in grads]


FORMS = {
    "naive": jax.jit(lambda q, k, v, s, scale: lightning_naive(q, k, v, s, scale=scale), static_argnums=4),
    "chunked": jax.jit(lambda q, k, v, s, scale: lightning_chunked(q, k, v, s, block_size=8, scale=scale),
                       static_argnums=4),
    "recurrent": jax.jit(lambda q, k, v, s, scale: lightning_recurrent(q, k, v, s, scale=scale)[0],
                         static_argnums=4),
}


@functools.cache
def _grad_fn(form):
  fn = FORMS[form]
  return jax.jit(lambda q, k, v, w, s: _value_and_grads(lambda q, k, v: fn(q, k, v, s, 1.0), q, k, v, w)[1])


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("n", [5, 37])  # 5 < block 8; 37 = 4 full blocks of 8 + a partial one of 5
def test_forms_match_float64_reference(form, n):
  q, k, v, w = _inputs(n)
  s = jnp.asarray(log_decay("tnl", H), jnp.float32)
  o_ref, g_ref = _reference(q, k, v, w, s)
  np.testing.assert_allclose(FORMS[form](q, k, v, s, 1.0), o_ref, rtol=1e-4, atol=1e-5)
  for g, gr in zip(_grad_fn(form)(q, k, v, w, s), g_ref):
    np.testing.assert_allclose(g, gr, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("schedule", ["fla", "none"])
def test_chunked_other_schedules_and_scale(schedule):
  q, k, v, w = _inputs(21, b=1)
  s = jnp.asarray(log_decay(schedule, H, layer=1, num_layers=4), jnp.float32)
  o_ref, _ = _reference(q, k, v, w, s, scale=D ** -0.5)
  np.testing.assert_allclose(FORMS["chunked"](q, k, v, s, D ** -0.5), o_ref, rtol=1e-4, atol=1e-5)


def test_no_decay_is_prefix_sum_linear_attention():
  q, k, v, _ = _inputs(19)
  zero = jnp.zeros((H,))
  want = linear_attention_cumsum(q, k, v)
  for form in ("chunked", "recurrent"):
    np.testing.assert_allclose(FORMS[form](q, k, v, zero, 1.0), want, rtol=1e-4, atol=1e-4)


def test_strong_decay_long_sequence_never_overflows():
  """lambda^i * lambda^-j would be exp(20 * 512) = inf here; only non-negative powers are formed."""
  q, k, v, w = _inputs(512, b=1)
  s = jnp.asarray([20.0, 1.0, 0.0])
  f = jax.jit(lambda q, k, v: lightning_chunked(q, k, v, s, block_size=64))
  o = f(q, k, v)
  grads = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
  assert all(bool(jnp.isfinite(x).all()) for x in (o, *grads))
  # lambda ~ 2e-9: head 0 only sees its own token.
  np.testing.assert_allclose(o[:, :, 0], jnp.einsum("bnd,bnd->bn", q[:, :, 0], k[:, :, 0])[..., None] * v[:, :, 0],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(o, lightning_recurrent(q, k, v, s)[0], rtol=2e-4, atol=2e-4)


def test_prefill_state_then_decode_equals_parallel_forward():
  q, k, v, _ = _inputs(29)
  s = jnp.asarray(log_decay("tnl", H), jnp.float32)
  full = FORMS["naive"](q, k, v, s, 1.0)
  p = 13
  o_pre, state = lightning_chunked(q[:, :p], k[:, :p], v[:, :p], s, block_size=8, return_state=True)
  np.testing.assert_allclose(state, lightning_recurrent(q[:, :p], k[:, :p], v[:, :p], s)[1], rtol=1e-5, atol=1e-5)
  step = jax.jit(lambda q, k, v, st: lightning_step(q, k, v, s, st))
  outs = [o_pre]
  for t in range(p, q.shape[1]):
    o_t, state = step(q[:, t], k[:, t], v[:, t], state)
    outs.append(o_t[:, None])
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-4, atol=1e-5)
  # Chunked prefill continued by a chunked pass from the state (chunk boundaries anywhere).
  _, st5 = lightning_chunked(q[:, :5], k[:, :5], v[:, :5], s, block_size=8, return_state=True)
  rest = lightning_chunked(q[:, 5:], k[:, 5:], v[:, 5:], s, block_size=8, initial_state=st5)
  np.testing.assert_allclose(rest, full[:, 5:], rtol=1e-4, atol=1e-5)


def test_packed_segments_match_reference_and_isolate_documents():
  q, k, v, w = _inputs(37)
  s = jnp.asarray(log_decay("tnl", H), jnp.float32)
  # Runs starting inside blocks, on a block boundary (8, 16), a one-token run, and trailing padding (id 0).
  seg = jnp.asarray([[1] * 3 + [2] * 20 + [3] * 10 + [0] * 4, [1] * 8 + [2] * 8 + [3] * 1 + [4] * 20])
  with jax.enable_x64(True):
    want = lightning_ref(*(jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v)),
                         np.exp(-np.asarray(s, np.float64)), segment_ids=seg)
  chunked = jax.jit(lambda q, k, v: lightning_chunked(q, k, v, s, block_size=8, segment_ids=seg, return_state=True))
  o, state = chunked(q, k, v)
  o_rec, state_rec = lightning_recurrent(q, k, v, s, segment_ids=seg)
  for got in (o, o_rec, lightning_naive(q, k, v, s, segment_ids=seg)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state, state_rec, rtol=1e-5, atol=1e-5)
  # Changing document 1 of row 1 (tokens 0..7) leaves documents 2..4 untouched, gradients included.
  bump = lambda x: x.at[1, :8].add(3.0)
  np.testing.assert_allclose(chunked(bump(q), bump(k), bump(v))[0][1, 8:], o[1, 8:], rtol=1e-6, atol=1e-6)
  g = jax.grad(lambda k: jnp.sum(chunked(q, k, v)[0][1, 8:] * w[1, 8:]))(k)
  assert float(jnp.abs(g[1, :8]).max()) == 0.0


def test_causal_perturbing_the_future_keeps_the_past():
  q, k, v, _ = _inputs(37)
  s = jnp.asarray(log_decay("tnl", H), jnp.float32)
  t = 19
  bump = lambda x: x.at[:, t:].add(5.0)
  base = FORMS["chunked"](q, k, v, s, 1.0)
  moved = FORMS["chunked"](bump(q), bump(k), bump(v), s, 1.0)
  np.testing.assert_array_equal(base[:, :t], moved[:, :t])
  assert not np.allclose(base[:, t:], moved[:, t:])


def test_decay_schedules():
  np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
  np.testing.assert_allclose(alibi_slopes(12)[:8], alibi_slopes(8))
  np.testing.assert_allclose(alibi_slopes(12)[8:], [0.70710678, 0.35355339, 0.1767767, 0.08838835], rtol=1e-6)
  np.testing.assert_allclose(log_decay("tnl", 8, 0, 24), alibi_slopes(8) * (1 + 1e-5))
  np.testing.assert_allclose(log_decay("tnl", 8, 23, 24), alibi_slopes(8) * 1e-5)
  np.testing.assert_allclose(log_decay("fla", 8, 0, 24), np.arange(8.0))
  np.testing.assert_allclose(log_decay("fla", 8, 12, 24), 0.5 * np.arange(8.0))
  np.testing.assert_array_equal(log_decay("none", 4), np.zeros(4))


def test_bad_inputs_raise():
  q, k, v, _ = _inputs(8)
  s = jnp.zeros((H,))
  with pytest.raises(ValueError, match="rank 4"):
    lightning_chunked(q[0], k, v, s)
  with pytest.raises(ValueError, match="same shape"):
    lightning_naive(q, k[..., :4], v, s)
  with pytest.raises(ValueError, match="log_decay"):
    lightning_recurrent(q, k, v, jnp.zeros((H + 1,)))
  with pytest.raises(ValueError, match="block_size"):
    lightning_chunked(q, k, v, s, block_size=0)
  with pytest.raises(ValueError, match="initial_state"):
    lightning_chunked(q, k, v, s, initial_state=jnp.zeros((2, H, E, D)))
  with pytest.raises(ValueError, match="segment_ids"):
    lightning_chunked(q, k, v, s, segment_ids=jnp.zeros((2, 9), jnp.int32))
  with pytest.raises(ValueError, match="decay schedule"):
    log_decay("alibi", 4)
  with pytest.raises(ValueError, match="layer"):
    log_decay("tnl", 4, layer=4, num_layers=4)

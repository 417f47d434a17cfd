"""Pallas lightning kernel (interpret mode on CPU) vs the float64 reference: forward and gradient, lengths not
divisible by the block, no decay, bf16, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops.lightning import log_decay
from kernels_pallas.lightning import lightning_attention
from tests.ref_lightning import lightning_ref

H = 2


def _inputs(n, d, e, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k = (jax.random.normal(kk, (2, n, H, d)) * 0.5 for kk in ks[:2])
  return q, k, jax.random.normal(ks[2], (2, n, H, e)), jax.random.normal(ks[3], (2, n, H, e))


def _loss(fn, w):
  return lambda q, k, v: jnp.sum(fn(q, k, v) * w)


@pytest.mark.parametrize("n, d, e, block, schedule, scale", [
    (40, 16, 16, 16, "tnl", 1.0),  # 2 full blocks + a partial one (padded in the kernel)
    (32, 8, 16, 8, "none", 0.25),  # lambda = 1, e != d, q scale
])
def test_kernel_matches_reference(n, d, e, block, schedule, scale):
  q, k, v, w = _inputs(n, d, e)
  s = jnp.asarray(log_decay(schedule, H), jnp.float32)
  kernel = lambda q, k, v: lightning_attention(q, k, v, s, block_size=block, scale=scale, interpret=True)
  grads = jax.jit(jax.grad(_loss(kernel, w), argnums=(0, 1, 2)))(q, k, v)
  out = jax.jit(kernel)(q, k, v)
  with jax.enable_x64(True):
    q64, k64, v64, w64 = (jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v, w))
    lam = np.exp(-np.asarray(s, np.float64))
    ref = lambda q, k, v: lightning_ref(q, k, v, lam, scale)
    want = ref(q64, k64, v64)
    want_grads = jax.grad(_loss(ref, w64), argnums=(0, 1, 2))(q64, k64, v64)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    for g, gw in zip(grads, want_grads):
      np.testing.assert_allclose(g, gw, rtol=1e-4, atol=1e-4)


def test_kernel_bf16():
  q, k, v, _ = _inputs(24, 16, 16)
  s = jnp.asarray(log_decay("tnl", H), jnp.float32)
  out = lightning_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), s, block_size=8, interpret=True)
  assert out.dtype == jnp.bfloat16
  with jax.enable_x64(True):
    want = lightning_ref(*(jnp.asarray(np.asarray(x.astype(jnp.bfloat16)), jnp.float64) for x in (q, k, v)),
                         np.exp(-np.asarray(s, np.float64)))
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2e-2, atol=2e-2)


def test_kernel_bad_inputs():
  q, k, v, _ = _inputs(8, 8, 8)
  with pytest.raises(ValueError, match="block_size"):
    lightning_attention(q, k, v, jnp.zeros((H,)), block_size=0)
  with pytest.raises(ValueError, match="log_decay"):
    lightning_attention(q, k, v, jnp.zeros((H + 1,)))

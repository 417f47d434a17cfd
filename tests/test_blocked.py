"""attend(impl="blocked"): the shared flash conformance grid (float64 references, forward, residual and gradients incl.
sinks at +-30), lengths that are not block multiples, decode steps, causality, linear memory, and impl="auto"'s
table with the backend simulated as GPU/TPU (never an error for a call some backend can take)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnlab
from attnlab.attention import dispatch
from attnlab.attention.blocked import blocked_attention
from kernels_pallas.testing import Case, check_case
from tests.flash_conformance import BIG, CASES, SLOW_CASES, reference_fn

EXTRA = [
    Case("softmax_ragged_len_37_gqa_segments_sinks", q_len=37, kv_len=37, segments=True, sinks=BIG),
    Case("softmax_decode_q1_sinks_window", q_len=1, kv_len=45, window=20, sinks=BIG),
    Case("softmax_decode_q5_ragged", q_len=5, kv_len=45, sinks=BIG, block_q=4, block_kv=16),
    Case("softpick_window_ragged", score="softpick", q_len=29, kv_len=29, window=6, block_q=8, block_kv=8),
    Case("softplus_window_ragged_decode", score="softplus", q_len=7, kv_len=41, window=13, block_q=4, block_kv=8),
    Case("softmax_mqa_noncausal_window", heads=4, kv_heads=1, causal=False, window=10, block_q=8, block_kv=8),
]


def blocked_fn(case: Case):
  return functools.partial(blocked_attention, block_q=case.block_q, block_kv=case.block_kv, return_residuals=True)


@pytest.mark.parametrize("case", CASES + EXTRA, ids=lambda c: c.name)
def test_conformance(case):
  check_case(blocked_fn(case), reference_fn, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=lambda c: c.name)
def test_conformance_slow(case):
  check_case(blocked_fn(case), reference_fn, case)


def _qkv(b=1, t=40, h=4, hkv=2, d=16, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, t, h, d)), jax.random.normal(kk, (b, t, hkv, d)),
          jax.random.normal(kv, (b, t, hkv, d)))


def test_attend_blocked_matches_xla_and_is_causal():
  q, k, v = _qkv()
  sinks = jnp.array([-30.0, 0.0, 3.0, 30.0])
  fn = jax.jit(lambda q, k, v: attnlab.attend(q, k, v, sink_logits=sinks, impl="blocked"))
  o = fn(q, k, v)
  np.testing.assert_allclose(o, attnlab.attend(q, k, v, sink_logits=sinks), atol=2e-6)
  t0 = 20  # perturbing future keys/values leaves past outputs unchanged (bit-exact)
  o2 = fn(q, k.at[:, t0:].add(5.0), v.at[:, t0:].multiply(-3.0))
  np.testing.assert_array_equal(o2[:, :t0], o[:, :t0])
  assert not np.allclose(o2[:, t0:], o[:, t0:])


def _range_reference(q, k, v, lo, hi, *, causal, sinks):
  """float64: softmax over keys lo_i <= j < hi_i (and j <= i + kv_len - q_len if causal) plus a sink logit per
  head; a row with no visible key puts all its weight on the sink (o = 0)."""
  with jax.enable_x64(True):
    q, k, v, sinks = (jnp.asarray(x, jnp.float64) for x in (q, k, v, sinks))
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    i, j = jnp.arange(q.shape[1])[:, None] + k.shape[1] - q.shape[1], jnp.arange(k.shape[1])[None, :]
    visible = (j >= lo[:, None]) & (j < hi[:, None]) & ((j <= i) | (not causal))
    sink = sinks[None, :, None, None]
    m = jnp.maximum(jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1, keepdims=True), sink)
    e = jnp.where(visible, jnp.exp(s - m), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", e / (e.sum(-1, keepdims=True) + jnp.exp(sink - m)), v)


@pytest.mark.parametrize("causal", [False, True])
def test_key_range_matches_reference(causal):
  """Per-query key ranges (empty, inside one tile, across tiles) on top of causal masks, with GQA and sinks:
  forward and gradients against float64."""
  q, k, v = _qkv(b=2, t=90, h=4, hkv=2)
  q = q[:, :70]  # end-aligned: 70 queries over 90 keys
  lo = jax.random.randint(jax.random.key(3), (70,), 0, 70)
  hi = (lo + jax.random.randint(jax.random.key(4), (70,), 0, 40)).at[5].set(lo[5])  # row 5 sees nothing
  sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
  fast = lambda q, k, v: blocked_attention(q, k, v, causal=causal, key_range=(lo, hi), sink_logits=sinks,
                                           block_q=16, block_kv=16)
  slow = functools.partial(_range_reference, lo=lo, hi=hi, causal=causal, sinks=sinks)
  np.testing.assert_allclose(jax.jit(fast)(q, k, v), slow(q, k, v), atol=2e-6)
  proj = jax.random.normal(jax.random.key(5), q.shape)
  grads = jax.grad(lambda *a: jnp.sum(fast(*a) * proj), argnums=(0, 1, 2))(q, k, v)
  with jax.enable_x64(True):
    ref_grads = jax.grad(lambda *a: jnp.sum(slow(*a) * proj), argnums=(0, 1, 2))(
        *(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=5e-6)
  assert np.abs(np.asarray(jax.jit(fast)(q, k, v))[:, 5]).max() == 0.0


def test_key_range_bad_input():
  q, k, v = _qkv()
  lo = jnp.zeros(40, jnp.int32)
  with pytest.raises(ValueError, match=r"key_range \(lo, hi\) must be integer arrays of shape \(q_len,\) = \(40,\)"):
    blocked_attention(q, k, v, key_range=(lo, lo[:30]))
  with pytest.raises(ValueError, match="key_range: score function 'relu' depends on the visible-key count"):
    blocked_attention(q, k, v, score="relu", key_range=(lo, lo + 40))


def test_blocked_declines_dense_bias_and_unhooked_scores():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="impl='blocked' cannot run this call: a dense bias/mask"):
    attnlab.attend(q, k, v, mask=jnp.ones((40, 40), bool), impl="blocked")
  with pytest.raises(ValueError, match="LSSA only"):
    attnlab.attend(q, k, v, score="softplus", reweight_power=3, impl="blocked")
  with pytest.raises(ValueError, match="window must be a positive int"):
    attnlab.attend(q, k, v, window=0, impl="blocked")


def _temp_bytes(n, d=16):
  spec = jax.ShapeDtypeStruct((1, n, 2, d), jnp.float32)
  loss = lambda q, k, v: jnp.sum(blocked_attention(q, k, v, block_q=128, block_kv=128))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(spec, spec, spec).lower().compile() \
      .memory_analysis().temp_size_in_bytes


def test_memory_is_linear_no_n_by_n_buffer():
  small, large = _temp_bytes(1024), _temp_bytes(4096)
  assert large < 4096 * 4096 * 4 / 16, large  # far below one n x n float32 map
  assert large < 2.5 * 4 * small, (small, large)  # ~4x for 4x the length (quadratic would be 16x)


# impl="auto": which backend takes each call, per platform (simulated).
S = jax.ShapeDtypeStruct


def _pick(monkeypatch, platform, q_shape, kv_shape, **call):
  monkeypatch.setattr(jax, "default_backend", lambda: platform)
  q, k = S(q_shape, jnp.float32), S(kv_shape, jnp.float32)
  call = dict(dict(score="softmax", causal=True, window=None, bias=None, mask=None, segment_ids=None,
                   sink_logits=None, score_params={}), **call)
  return dispatch.select_backend("auto", q, k, k, **call).name


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_auto_on_accelerators_falls_through_instead_of_raising(monkeypatch, platform):
  """The kernel takes what its block-size resolution accepts; everything else goes to blocked, then dense."""
  assert _pick(monkeypatch, platform, (1, 256, 4, 64), (1, 256, 2, 64)) == "pallas"
  assert _pick(monkeypatch, platform, (1, 256, 4, 64), (1, 256, 2, 64), window=64) == "pallas"
  assert _pick(monkeypatch, platform, (1, 200, 4, 64), (1, 200, 2, 64)) == "blocked"  # 128 does not divide 200
  if platform == "gpu":  # Triton: blocks powers of two >= 16, head_dim a power of two >= 16
    assert _pick(monkeypatch, platform, (1, 1, 4, 64), (1, 256, 2, 64)) == "blocked"  # decode step
    assert _pick(monkeypatch, platform, (1, 48, 4, 64), (1, 48, 2, 64)) == "blocked"
    assert _pick(monkeypatch, platform, (1, 256, 4, 8), (1, 256, 2, 8)) == "blocked"
  mask = jnp.ones((256, 256), bool)
  assert _pick(monkeypatch, platform, (1, 256, 4, 64), (1, 256, 2, 64), mask=mask) == "xla"
  assert _pick(monkeypatch, platform, (1, 256, 4, 64), (1, 256, 2, 64), score="softplus",
               score_params={"reweight_power": 3.0}) == "xla"


def test_auto_on_cpu_uses_the_measured_crossover(monkeypatch):
  n = dispatch.BLOCKED_CPU_MIN_LEN
  assert _pick(monkeypatch, "cpu", (1, n // 2, 4, 64), (1, n // 2, 2, 64)) == "xla"
  assert _pick(monkeypatch, "cpu", (1, n, 4, 64), (1, n, 2, 64)) == "blocked"
  assert _pick(monkeypatch, "cpu", (1, 1, 4, 64), (1, 4 * n, 2, 64)) == "xla"  # decode: one row, dense is cheaper
  assert _pick(monkeypatch, "cpu", (1, n, 4, 64), (1, n, 2, 64), mask=jnp.ones((n, n), bool)) == "xla"


@pytest.mark.parametrize("shape", [(1, 1, 4, 16, 33), (1, 48, 4, 16, 48), (1, 24, 4, 8, 200)],
                         ids=["decode_q1", "q48", "kv200_d8"])
def test_auto_runs_calls_the_gpu_kernel_refuses(monkeypatch, shape):
  """With the backend simulated as a GPU, attend(impl="auto") answers (via blocked) and matches the dense path."""
  b, t, h, d, kv_len = shape
  q, _, _ = _qkv(b, t, h, 2, d, seed=1)
  _, k, v = _qkv(b, kv_len, h, 2, d, seed=2)
  sinks = jnp.array([-30.0, 0.0, 3.0, 30.0])
  expected = attnlab.attend(q, k, v, sink_logits=sinks, window=17)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  out = attnlab.attend(q, k, v, sink_logits=sinks, window=17, impl="auto")
  np.testing.assert_allclose(out, expected, atol=2e-6)

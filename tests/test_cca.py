"""CCA attention: fast path vs the float64 dense reference (forward and gradient), degenerate cases, causality,
the compressed decode cache, score-function composition, and the module in the LM."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnlab
from attnlab.attention.cca import (cca_attention, cca_decode_step, cca_num_keys, cca_prefill, cca_weights,
                                   check_cca_params)
from attnlab.attention.registry import attention_config_class
from attnlab.attention.variants.cca import CCAAttention, CCAConfig
from tests.ref_cca import ref_cca, ref_mask

STATIC = ("group_size", "window_size", "score", "block_q", "remat", "impl")
fast = jax.jit(cca_attention, static_argnames=STATIC + ("b", "normalize", "eps"))
causal = jax.jit(attnlab.attend)


def ref(q, k, v, **kw):
  """The float64 reference, jitted (eager float64 loops are slow)."""
  with jax.enable_x64(True):
    return jax.jit(functools.partial(ref_cca, **kw))(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))


def _qkv(seed, b, n, h, hkv, d, scale=1.0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (scale * jax.random.normal(ks[0], (b, n, h, d)), scale * jax.random.normal(ks[1], (b, n, hkv, d)),
          jax.random.normal(ks[2], (b, n, hkv, d)))


# (batch, seq, heads, kv_heads, head_dim, g, s, block_q)
CONFIGS = [
    (2, 40, 4, 2, 8, 4, 8, 16),  # GQA, 3 blocks with a raw-key band, seq not a multiple of block_q
    (1, 37, 2, 2, 8, 3, 6, 8),  # seq not a multiple of g, 5 blocks smaller than s + g
    (1, 32, 2, 1, 8, 8, 0, 64),  # s = 0 (a group's last query sees its own core token), one dense block
]


@pytest.mark.parametrize("impl", ["blocked", "xla"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_forward_and_gradient_match_reference(cfg, impl):
  b, n, h, hkv, d, g, s, bq = cfg
  q, k, v = _qkv(0, b, n, h, hkv, d, scale=1.5)
  kw = dict(group_size=g, window_size=s)
  proj = jax.random.normal(jax.random.key(9), (b, n, h, d))

  def fwd_grad(f):
    def run(q, k, v):
      out, vjp = jax.vjp(f, q, k, v)
      return out, vjp(proj.astype(out.dtype))
    return jax.jit(run)

  out, grads = fwd_grad(functools.partial(cca_attention, block_q=bq, impl=impl, **kw))(q, k, v)
  with jax.enable_x64(True):
    ref_out, ref_grads = fwd_grad(functools.partial(ref_cca, **kw))(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
  np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5)
  for got, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(got, ref, atol=5e-5, rtol=1e-4)


def test_pooling_changes_the_output_and_reference_mask_covers_each_token_once():
  """The test can fail: CCA differs from causal attention once groups are pooled; and the reference mask covers
  every earlier token exactly once (by a visible core token or the window)."""
  q, k, v = _qkv(1, 2, 40, 4, 2, 8, scale=1.5)
  out = fast(q, k, v, group_size=4, window_size=8, block_q=16)
  assert np.abs(out - causal(q, k, v)).max() > 1e-2
  g, s, n = 4, 8, 40
  mask = ref_mask(n, g, s)
  m = mask.shape[1] - n
  covered = mask[:, m:].astype(int) + np.repeat(mask[:, :m], g, axis=1).astype(int) @ np.eye(m * g, n, dtype=int)
  np.testing.assert_array_equal(covered, np.tril(np.ones((n, n), int)))


@pytest.mark.parametrize("impl", ["blocked", "xla"])
@pytest.mark.parametrize("g,s", [(1, 8), (4, 40)])  # g = 1; s >= seq_len
def test_reduces_to_causal_attention(g, s, impl):
  q, k, v = _qkv(2, 2, 40, 4, 2, 8, scale=1.5)
  out = fast(q, k, v, group_size=g, window_size=s, block_q=16, impl=impl)
  np.testing.assert_allclose(out, causal(q, k, v), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["blocked", "xla"])
def test_causality_functional(impl):
  q, k, v = _qkv(3, 2, 40, 4, 2, 8)
  t = 22
  q2, k2, v2 = (x.at[:, t + 1:].add(3.0) for x in (q, k, v))
  kw = dict(group_size=4, window_size=8, block_q=16, impl=impl)
  a, b = fast(q, k, v, **kw), fast(q2, k2, v2, **kw)
  np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6)
  assert np.abs(a[:, t + 1:] - b[:, t + 1:]).max() > 1e-3


@pytest.mark.parametrize("score,params", [("softpick", {}), ("sigmoid", {"normalize": True}),
                                          ("sigmoid", {"b": 0.0}), ("relu", {}), ("softplus", {})])
def test_score_functions_match_reference(score, params):
  q, k, v = _qkv(4, 2, 40, 4, 2, 8)
  kw = dict(group_size=4, window_size=8, score=score, **params)
  np.testing.assert_allclose(fast(q, k, v, block_q=16, **kw), ref(q, k, v, **kw), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["blocked", "xla"])
def test_sink_logits_match_reference(impl):
  """Forward and the gradient of the sink logits (the blocked path adds the sink to the band part only)."""
  q, k, v = _qkv(5, 2, 40, 4, 2, 8)
  sinks = jnp.array([0.0, 1.0, -1.0, 2.0])
  proj = jax.random.normal(jax.random.key(3), q.shape)
  loss = lambda f: lambda sinks: jnp.sum(f(sinks) * proj)
  fast_fn = lambda sinks: cca_attention(q, k, v, block_q=16, group_size=4, window_size=8, sink_logits=sinks,
                                        impl=impl)
  out, dsinks = jax.jit(lambda s: (fast_fn(s), jax.grad(loss(fast_fn))(s)))(sinks)
  with jax.enable_x64(True):
    q64, k64, v64 = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
    ref_fn = lambda sinks: ref_cca(q64, k64, v64, group_size=4, window_size=8, sink_logits=sinks)
    s64 = jnp.asarray(sinks, jnp.float64)
    ref_out, ref_dsinks = jax.jit(lambda s: (ref_fn(s), jax.grad(loss(ref_fn))(s)))(s64)
  np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(dsinks, ref_dsinks, atol=5e-5, rtol=1e-4)
  assert np.abs(ref_dsinks).min() > 1e-3  # every sink's gradient is exercised


def test_blocked_impl_is_softmax_only():
  q, k, v = _qkv(0, 1, 16, 2, 2, 4)
  with pytest.raises(ValueError, match="impl='blocked' runs the softmax score only"):
    cca_attention(q, k, v, group_size=2, window_size=4, score="relu", impl="blocked")
  with pytest.raises(ValueError, match="CCA impl must be one of"):
    cca_attention(q, k, v, group_size=2, window_size=4, impl="pallas")
  with pytest.raises(ValueError, match="CCAConfig.impl='blocked' runs the softmax score only"):
    CCAConfig(impl="blocked", score="relu")
  assert CCAConfig().impl == "auto" and CCAConfig(score="relu").impl == "auto"


def test_effective_weights():
  q, k, v = _qkv(6, 1, 24, 4, 2, 8, scale=1.5)
  kw = dict(group_size=4, window_size=8)
  w = jax.jit(functools.partial(cca_weights, **kw))(q, k)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
  assert np.all(np.triu(np.asarray(w[0, 0]), 1) == 0)
  o = jnp.einsum("bhqk,bkhd->bqhd", w, jnp.repeat(v, 2, axis=2))
  np.testing.assert_allclose(o, fast(q, k, v, **kw), atol=1e-5)
  np.testing.assert_allclose(jax.jit(functools.partial(cca_weights, group_size=1, window_size=4))(q, k),
                             jax.jit(attnlab.attention_weights)(q, k), atol=1e-6)


def test_bad_parameters():
  with pytest.raises(ValueError, match="window_size % group_size"):
    check_cca_params(4, 6)
  with pytest.raises(ValueError, match="window_size % group_size"):
    CCAConfig(group_size=16, window_size=40)
  with pytest.raises(ValueError, match="group_size must be >= 1"):
    CCAConfig(group_size=0)
  with pytest.raises(TypeError, match="causal"):  # CCA is causal by construction: the field does not exist
    CCAConfig(causal=False)
  with pytest.raises(TypeError, match="sink_token"):
    CCAConfig(sink_token=True)
  with pytest.raises(ValueError, match="impl"):
    CCAConfig(impl="pallas")
  q, k, v = _qkv(0, 1, 8, 2, 2, 4)
  with pytest.raises(ValueError, match="window_size % group_size"):
    cca_attention(q, k, v, group_size=3, window_size=4)
  with pytest.raises(ValueError, match="sink_logits"):
    cca_attention(q, k, v, group_size=2, window_size=4, score="relu", sink_logits=jnp.zeros(2))


def test_num_keys():
  assert cca_num_keys(16, 1, 4) == pytest.approx(8.5)  # causal: mean of 1..16
  assert cca_num_keys(64, 8, 8) < 0.6 * cca_num_keys(64, 1, 8)


@pytest.mark.parametrize("prefix", [3, 13])
def test_prefill_then_decode_matches_full_forward(prefix):
  b, n, h, hkv, d, g, s = 2, 30, 4, 2, 8, 4, 8
  q, k, v = _qkv(7, b, n, h, hkv, d, scale=1.5)
  kw = dict(group_size=g, window_size=s)
  full = fast(q, k, v, block_q=16, **kw)
  out, cache = jax.jit(functools.partial(cca_prefill, max_len=n, block_q=16, **kw))(q[:, :prefix], k[:, :prefix],
                                                                                 v[:, :prefix])
  np.testing.assert_allclose(out, full[:, :prefix], atol=1e-5)
  step = jax.jit(functools.partial(cca_decode_step, **kw))
  for t in range(prefix, n):
    o, cache = step(cache, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
    np.testing.assert_allclose(o[:, 0], full[:, t], atol=1e-5, err_msg=f"position {t}")
    assert int(cache.count) <= s + g - 1
  assert int(cache.num_core) == (n - s) // g and int(cache.length) == n


@pytest.fixture(scope="module")
def lm():
  attn = CCAConfig(num_heads=4, num_kv_heads=2, group_size=4, window_size=8, block_q=16, sink_logit=True,
                   gate="headwise")
  cfg = attnlab.ModelConfig(vocab_size=50, d_model=32, num_layers=1, attention=attn, max_seq_len=64)
  return attnlab.DecoderLM(cfg, rngs=nnx.Rngs(0))


def test_registered_and_trains_in_the_lm(lm):
  assert attention_config_class("cca") is CCAConfig
  tokens = jax.random.randint(jax.random.key(0), (2, 40), 0, 50)

  def loss(model):
    logits = model(tokens)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))

  value, grads = nnx.jit(nnx.value_and_grad(loss))(lm)
  assert np.isfinite(value)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  _, aux = nnx.jit(lambda m: m(tokens, return_internals=True))(lm)
  layer = aux["layers"][0]
  assert layer["weights"].shape == (2, 4, 40, 40)
  np.testing.assert_allclose(layer["weights"].sum(-1) + layer["sink_mass"], 1.0, atol=1e-5)


def test_causality_in_the_lm(lm):
  tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, 50)
  t = 30
  other = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % 50)
  run = nnx.jit(lambda m, x: m(x))
  a, b = run(lm, tokens), run(lm, other)
  np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-5)
  assert np.abs(a[:, t + 1:] - b[:, t + 1:]).max() > 1e-4


def test_module_prefill_and_decode_match_forward():
  cfg = CCAConfig(num_heads=4, num_kv_heads=2, group_size=4, window_size=8, block_q=16, qk_norm=True)
  layer = CCAAttention(cfg, 32, rngs=nnx.Rngs(3))
  n, prefix = 26, 5
  x = jax.random.normal(jax.random.key(2), (2, n, 32))
  pos = jnp.broadcast_to(jnp.arange(n), (2, n))
  full, _ = nnx.jit(lambda m: m(x, positions=pos))(layer)
  y, cache = nnx.jit(lambda m: m.prefill(x[:, :prefix], positions=pos[:, :prefix],
                                          cache=m.init_cache(2, n)))(layer)
  np.testing.assert_allclose(y, full[:, :prefix], atol=1e-5)
  step = nnx.jit(lambda m, x, p, c: m.step(x, position=p, cache=c))
  for t in range(prefix, n):
    y, cache = step(layer, x[:, t:t + 1], t, cache)
    np.testing.assert_allclose(y[:, 0], full[:, t], atol=1e-5, err_msg=f"position {t}")
  with pytest.raises(ValueError, match="segment_ids"):
    layer(x, positions=pos, segment_ids=jnp.zeros((2, n), jnp.int32))

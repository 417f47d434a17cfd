"""Routing attention: vectorised fast paths vs float64 loop references (forward and gradient), degenerate case,
causality, k-means EMA and commitment loss, and the module inside the LM."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import attnlab
from attnlab.attention.routing import (balanced_assignment, balanced_attention, commitment_loss, kmeans_ema_update,
                                       layer_norm, local_attention, nearest_attention, nearest_centroid,
                                       routing_weights)
from attnlab.attention.variants.routing import KMeansState, RoutingAttention, RoutingConfig
from tests import ref_routing as ref

B, N, H, D = 2, 24, 2, 8


def _inputs(seed, n=N, k=4):
  ks = jax.random.split(jax.random.key(seed), 5)
  r = layer_norm(jax.random.normal(ks[0], (B, n, H, D)))
  mu = layer_norm(jax.random.normal(ks[1], (H, k, D)))
  qk = jax.random.normal(ks[2], (B, n, H, D))
  v = jax.random.normal(ks[3], (B, n, H, D))
  proj = jax.random.normal(ks[4], (B, n, H, D))
  return r, mu, qk, v, proj


SEGMENTS = np.array([[0] * 10 + [1] * 14, [0] * 24])


def _fast_and_grad(fn, qk, v, proj):
  loss = lambda qk, v: jnp.sum(fn(qk, v) * proj)
  return fn(qk, v), jax.grad(loss, argnums=(0, 1))(qk, v)


def _ref_and_grad(fn, qk, v, proj):
  with jax.enable_x64(True):
    qk, v, proj = (jnp.asarray(np.asarray(a), jnp.float64) for a in (qk, v, proj))
    loss = lambda qk, v: jnp.sum(fn(qk, v) * proj)
    out = fn(qk, v)
    grads = jax.grad(loss, argnums=(0, 1))(qk, v)
    return np.asarray(out), [np.asarray(g) for g in grads]


def _assert_close(fast, want, atol=2e-5):
  (out, grads), (rout, rgrads) = fast, want
  np.testing.assert_allclose(out, rout, atol=atol, rtol=1e-4)
  for g, rg in zip(grads, rgrads):
    np.testing.assert_allclose(g, rg, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("window,segments", [(6, False), (9, True)])
def test_balanced_matches_loop_reference(window, segments):
  r, mu, qk, v, proj = _inputs(0)
  seg = jnp.asarray(SEGMENTS) if segments else None
  idx = balanced_assignment(r, mu, window)
  assert idx.shape == (B, H, 4, window)
  assert bool(jnp.all(jnp.diff(idx, axis=-1) > 0))  # w distinct members, sorted by position
  member, pair = ref.balanced_masks(r, mu, window, None if seg is None else SEGMENTS)
  np.testing.assert_array_equal(np.asarray(jnp.zeros((B, H, 4, N), bool).at[
      np.arange(B)[:, None, None, None], np.arange(H)[None, :, None, None], np.arange(4)[None, None, :, None],
      idx].set(True)), member)
  fast = _fast_and_grad(jax.jit(lambda qk, v: balanced_attention(qk, v, idx, segment_ids=seg)), qk, v, proj)
  want = _ref_and_grad(lambda qk, v: ref.balanced_attention_ref(qk, v, member, pair, D ** -0.5), qk, v, proj)
  _assert_close(fast, want)
  w = routing_weights(qk, routing="balanced", window=window, idx=idx, segment_ids=seg)
  np.testing.assert_allclose(jnp.einsum("bhts,bshd->bthd", w, v), fast[0], atol=2e-5)


@pytest.mark.parametrize("impl", ["chunks", "blocked"])
@pytest.mark.parametrize("window,segments", [(3, False), (5, True), (24, False)])
def test_nearest_matches_loop_reference(window, segments, impl):
  r, mu, qk, v, proj = _inputs(1)
  seg = jnp.asarray(SEGMENTS) if segments else None
  cluster = nearest_centroid(r, mu)
  np.testing.assert_array_equal(cluster, ref.ref_nearest(r, mu))
  mask = ref.nearest_mask(cluster, window, None if seg is None else SEGMENTS)
  fast = _fast_and_grad(jax.jit(lambda qk, v: nearest_attention(qk, v, cluster, window=window, segment_ids=seg,
                                                                 impl=impl)), qk, v, proj)
  want = _ref_and_grad(lambda qk, v: ref.dense_attention(qk, qk, v, mask, D ** -0.5), qk, v, proj)
  _assert_close(fast, want)
  w = routing_weights(qk, routing="nearest", window=window, cluster=cluster, segment_ids=seg)
  np.testing.assert_allclose(jnp.einsum("bhts,bshd->bthd", w, v), fast[0], atol=2e-5)


@pytest.mark.parametrize("block,segments", [(5, True)])
def test_local_matches_loop_reference(block, segments):
  _, _, q, v, proj = _inputs(2)
  k = jax.random.normal(jax.random.key(9), q.shape)
  seg = jnp.asarray(SEGMENTS) if segments else None
  mask = ref.local_ref_mask(N, block, None if seg is None else SEGMENTS, b=B)
  loss = lambda q, k, v, fn: jnp.sum(fn(q, k, v) * proj)
  fast_fn = lambda q, k, v: local_attention(q, k, v, block=block, segment_ids=seg)
  out, grads = fast_fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v, fast_fn)
  with jax.enable_x64(True):
    q64, k64, v64 = (jnp.asarray(np.asarray(a), jnp.float64) for a in (q, k, v))
    ref_fn = lambda q, k, v: ref.dense_attention(q, k, v, mask, D ** -0.5)
    rout, rgrads = ref_fn(q64, k64, v64), jax.grad(loss, argnums=(0, 1, 2))(q64, k64, v64, ref_fn)
    np.testing.assert_allclose(out, np.asarray(rout), atol=2e-5, rtol=1e-4)
    for g, rg in zip(grads, rgrads):
      np.testing.assert_allclose(g, np.asarray(rg), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("routing", ["balanced", "nearest"])
def test_one_cluster_full_window_is_causal_softmax_over_ln_q(routing):
  q = jax.random.normal(jax.random.key(3), (B, N, H, D)) * 3.0 + 1.0
  v = jax.random.normal(jax.random.key(4), (B, N, H, D))
  x = layer_norm(q)
  mu = layer_norm(jax.random.normal(jax.random.key(5), (H, 1, D)))
  if routing == "balanced":
    out = balanced_attention(x, v, balanced_assignment(x, mu, N))
  else:
    out = nearest_attention(x, v, nearest_centroid(x, mu), window=N)
  np.testing.assert_allclose(out, attnlab.attend(x, x, v, causal=True), atol=1e-5)
  # LN without scale/bias: zero mean, unit variance, norm sqrt(d)
  np.testing.assert_allclose(jnp.linalg.norm(x, axis=-1), D ** 0.5, rtol=1e-4)
  np.testing.assert_allclose(x, ref.ref_layer_norm(q), atol=1e-5)


def test_kmeans_ema_update_and_commitment_loss():
  r, mu, _, _, _ = _inputs(6)
  cluster = nearest_centroid(r, mu)
  count0 = jnp.array([[1.0, 2.0, 0.5, 3.0], [0.0, 1.0, 1.0, 1.0]])
  sum0 = mu * count0[..., None]
  got = kmeans_ema_update(count0, sum0, r, cluster, decay=0.9, eps=1e-2)
  want = ref.kmeans_update_ref(count0, sum0, r, np.asarray(cluster), 0.9, 1e-2)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  # hand-computed toy: one head, 2 clusters, tokens (1,0),(3,0) -> cluster 0, (0,2) -> cluster 1
  toy = jnp.array([[[[1.0, 0.0]], [[3.0, 0.0]], [[0.0, 2.0]]]])  # (1, 3, 1, 2)
  c = jnp.array([[[0], [0], [1]]])
  count, total, means = kmeans_ema_update(jnp.ones((1, 2)), jnp.zeros((1, 2, 2)), toy, c, decay=0.5, eps=0.0)
  np.testing.assert_allclose(count, [[1.5, 1.0]])
  np.testing.assert_allclose(total, [[[2.0, 0.0], [0.0, 1.0]]])
  np.testing.assert_allclose(means, [[[2.0 / 1.5, 0.0], [0.0, 1.0]]], rtol=1e-6)
  # commitment loss: value beta * mean((x - mu_c)^2), gradient only into x
  beta = 1e-4
  loss, (gr, gmu) = jax.value_and_grad(lambda r, mu: commitment_loss(r, mu, cluster, beta), argnums=(0, 1))(r, mu)
  sel = np.asarray(mu)[np.arange(H)[None, None], np.asarray(cluster)]
  np.testing.assert_allclose(loss, beta * np.mean((np.asarray(r) - sel) ** 2), rtol=1e-5)
  np.testing.assert_allclose(gr, 2 * beta * (np.asarray(r) - sel) / r.size, rtol=1e-4, atol=1e-12)
  assert not np.any(np.asarray(gmu))


def _module(routing, **kw):
  cfg = RoutingConfig(num_heads=4, num_routing_heads=2, num_clusters=4, local_block=8, routing=routing, **kw)
  m = RoutingAttention(cfg, 32, rngs=nnx.Rngs(0))
  m.eval()
  return m


@pytest.mark.parametrize("routing,causal", [("nearest", True), ("balanced", False)])
def test_perturb_the_future(routing, causal):
  """nearest: the past never changes. balanced (the reference rule): top-w membership looks at the whole
  sequence, so perturbing the future changes past outputs -- a documented property, not a bug of this code."""
  m = _module(routing, window=8)  # k·w = n: with w >= n every balanced cluster holds every token
  n, t0 = 32, 20
  x = jax.random.normal(jax.random.key(7), (B, n, 32))
  x2 = x.at[:, t0:].set(5.0 * jax.random.normal(jax.random.key(8), (B, n - t0, 32)))
  pos = jnp.broadcast_to(jnp.arange(n), (B, n))
  f = nnx.jit(lambda m, x: m(x, positions=pos)[0])
  y, y2 = f(m, x), f(m, x2)
  past = float(jnp.abs(y[:, :t0] - y2[:, :t0]).max())
  if causal:
    assert past < 1e-6
  else:
    assert past > 1e-3
  assert float(jnp.abs(y[:, t0:] - y2[:, t0:]).max()) > 1e-3


def test_state_is_not_a_param_and_updates_only_in_training():
  m = _module("nearest")
  assert isinstance(m.centroids, KMeansState) and not isinstance(m.centroids, nnx.Param)
  assert not any("centroids" in str(p) or "ema_" in str(p) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param)))
  x = jax.random.normal(jax.random.key(10), (B, 16, 32))
  pos = jnp.broadcast_to(jnp.arange(16), (B, 16))
  mu0 = m.centroids[...]
  m(x, positions=pos)
  np.testing.assert_array_equal(m.centroids[...], mu0)  # eval: frozen
  m.train()
  assert m.deterministic is False
  count0, sum0 = m.ema_count[...], m.ema_sum[...]
  r = layer_norm(m.route_q(x).reshape(B, 16, 2, 8))
  _, aux = m(x, positions=pos)
  want = kmeans_ema_update(count0, sum0, r, nearest_centroid(r, mu0), decay=0.999, eps=1e-5)
  for var, w in zip((m.ema_count, m.ema_sum, m.centroids), want):
    np.testing.assert_allclose(var[...], w, rtol=1e-5, atol=1e-7)
  assert float(aux["aux_loss"]) > 0


@pytest.mark.parametrize("routing", ["nearest", pytest.param("balanced", marks=pytest.mark.slow)])
def test_lm_trains_with_finite_grads_and_carries_kmeans_state(routing):
  att = RoutingConfig(num_heads=4, num_routing_heads=2, num_clusters=4, local_block=8, routing=routing)
  cfg = attnlab.ModelConfig(d_model=32, num_layers=2, attention=att, max_seq_len=32, mlp_dim=64)
  model = attnlab.DecoderLM(cfg, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  tokens = jax.random.randint(jax.random.key(11), (B, 33), 0, cfg.vocab_size)

  @nnx.jit
  def step(model, opt, batch):
    def loss_fn(m):
      logits, aux = m(batch[:, :-1], return_aux=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean() + aux["aux_loss"]
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss, grads

  mu0 = model.blocks[0].attn.centroids[...]
  losses = []
  for _ in range(3):
    loss, grads = step(model, opt, tokens)
    losses.append(float(loss))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert losses[-1] < losses[0]
  assert float(jnp.abs(model.blocks[0].attn.centroids[...] - mu0).max()) > 0  # carried out of the jitted step
  _, aux = model(tokens[:, :16], return_internals=True)
  w = aux["layers"][0]["weights"]
  assert w.shape == (B, 4, 16, 16)
  rows = np.asarray(w.sum(-1))
  assert np.all((np.abs(rows - 1.0) < 1e-5) | ((routing == "balanced") & (np.abs(rows) < 1e-6)))  # unrouted: 0
  assert aux["layers"][0]["clusters"].shape == (B, 16, 2)


def test_config_errors():
  with pytest.raises(ValueError, match="routing must be"):
    RoutingConfig(routing="lsh")
  with pytest.raises(ValueError, match="num_routing_heads"):
    RoutingConfig(num_heads=4, num_routing_heads=5)
  with pytest.raises(TypeError, match="sink_logit"):
    RoutingConfig(sink_logit=True)
  with pytest.raises(ValueError, match="impl"):
    RoutingConfig(impl="pallas")
  with pytest.raises(ValueError, match="window must be"):
    balanced_assignment(jnp.zeros((1, 4, 1, 2)), jnp.zeros((1, 2, 2)), 5)
  with pytest.raises(ValueError, match="centroids must be"):
    nearest_centroid(jnp.zeros((1, 4, 1, 2)), jnp.zeros((2, 2, 2)))
  with pytest.raises(ValueError, match=r"nearest_attention impl must be one of \('chunks', 'blocked'\); got 'x'"):
    nearest_attention(jnp.zeros((1, 4, 1, 2)), jnp.zeros((1, 4, 1, 2)), jnp.zeros((1, 4, 1), int), window=2, impl="x")
  assert attnlab.attention.registry.attention_config_class("routing") is RoutingConfig

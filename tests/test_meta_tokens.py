"""Meta tokens (reconstruction of Shah et al. 2025): gathered meta-attention vs a dense float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab.attention.meta_tokens import meta_attention
from attnlab.attention.variants.meta_tokens import MetaTokenConfig
from attnlab.data.packing import rows_to_batch
from attnlab.data.special_tokens import MetaTokens, interleave
from attnlab.model.config import ModelConfig
from attnlab.model.lm import DecoderLM
from tests.ref_meta_tokens import ref_meta_attention

B, N, H, HKV, D = 2, 20, 4, 2, 8
META = np.zeros((B, N), bool)
META[0, [3, 7, 8, 15]] = True
META[1, [0, 11]] = True


def _inputs(seed):
  r = np.random.default_rng(seed)
  return (r.normal(size=(B, N, H, D)), r.normal(size=(B, N, HKV, D)), r.normal(size=(B, N, HKV, D)),
          r.normal(size=(B, N, H, D)))


def _loss(q, k, v, proj, mode, seg):
  return jnp.sum(meta_attention(q, k, v, jnp.asarray(META), mode=mode, segment_ids=seg)[0] * proj)


_vg = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1, 2)), static_argnums=4)


def _ref_loss(q, k, v, proj, mode, seg):
  return jnp.sum(ref_meta_attention(q, k, v, META, mode, seg) * proj)


@pytest.mark.parametrize("mode", ["meta_only", "all"])
@pytest.mark.parametrize("segments", [False, True])
def test_forward_and_gradient_match_dense_reference(mode, segments):
  q, k, v, proj = _inputs(0)
  seg = np.repeat(np.array([[0] * 9 + [1] * 11]), B, 0) if segments else None
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  out, dropped = meta_attention(f32(q), f32(k), f32(v), jnp.asarray(META), mode=mode,
                                segment_ids=None if seg is None else jnp.asarray(seg))
  val, grads = _vg(f32(q), f32(k), f32(v), f32(proj), mode, None if seg is None else jnp.asarray(seg))
  with jax.enable_x64(True):
    ref = ref_meta_attention(q, k, v, META, mode, seg)
    val_ref, grads_ref = jax.value_and_grad(_ref_loss, argnums=(0, 1, 2))(q, k, v, proj, mode, seg)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_allclose(val, val_ref, rtol=1e-4)
  for g, gr in zip(grads, grads_ref):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, gr, atol=1e-4)
  assert np.all(np.asarray(dropped) == 0)
  rows_without_keys = ~META if mode == "meta_only" else np.arange(N)[None] < np.argmax(META, 1)[:, None]
  assert np.all(np.asarray(out)[rows_without_keys] == 0)  # no visible key -> exactly 0


def test_causality():
  q, k, v, _ = (jnp.asarray(x, jnp.float32) for x in _inputs(1))
  t = 9
  bump = lambda x: x.at[:, t:].add(2.0)
  for mode in ("meta_only", "all"):
    o1, _ = meta_attention(q, k, v, jnp.asarray(META), mode=mode)
    o2, _ = meta_attention(bump(q), bump(k), bump(v), jnp.asarray(META).at[:, t + 1].set(True), mode=mode)
    np.testing.assert_array_equal(o1[:, :t], o2[:, :t])
    assert not np.allclose(o1[:, t:], o2[:, t:])


def test_capacity_counts_dropped_tokens():
  q, k, v, _ = (jnp.asarray(x, jnp.float32) for x in _inputs(2))
  out, dropped = meta_attention(q, k, v, jnp.asarray(META), mode="meta_only", capacity=2)
  np.testing.assert_array_equal(dropped, [2, 0])
  full, _ = meta_attention(q, k, v, jnp.asarray(META), mode="meta_only")
  np.testing.assert_allclose(out[:, :8], full[:, :8], atol=1e-6)  # the first two meta tokens of row 0 are kept
  assert np.all(np.asarray(out)[0, 8:] == 0)


def test_lm_with_meta_tokens_is_causal_and_trains():
  att = MetaTokenConfig(num_heads=4, meta_ids=(30, 31), meta_mode="all")
  model = DecoderLM(ModelConfig(vocab_size=32, d_model=32, num_layers=2, attention=att), rngs=nnx.Rngs(0))
  rows = np.random.default_rng(0).integers(0, 30, (2, N + 1))
  batch = interleave(rows_to_batch(rows, np.ones_like(rows)), MetaTokens((30, 31), 0.2), seq_len=N,
                     rng=np.random.default_rng(1), pad_id=0)
  x, y, w = (jnp.asarray(batch[k]) for k in ("inputs", "targets", "loss_mask"))
  assert bool(jnp.any(jnp.isin(x, jnp.array([30, 31]))))

  def loss(m):
    logp = jax.nn.log_softmax(m(x))
    return -jnp.sum(jnp.take_along_axis(logp, jnp.maximum(y, 0)[..., None], -1)[..., 0] * w) / jnp.sum(w)

  val, grads = nnx.value_and_grad(loss)(model)
  assert np.isfinite(val)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  meta_grad = grads["blocks"][0]["attn"]["meta_o"]["kernel"][...]
  assert float(jnp.abs(meta_grad).sum()) > 0  # the meta path is used
  logits = model(x)
  logits2 = model(x.at[:, 12:].set(5))
  np.testing.assert_allclose(logits[:, :12], logits2[:, :12], atol=1e-6)


def test_errors():
  with pytest.raises(ValueError, match="meta_mode"):
    MetaTokenConfig(meta_mode="both")
  with pytest.raises(ValueError, match="rate"):
    MetaTokens((9,), 1.5)
  with pytest.raises(ValueError, match="is_meta"):
    meta_attention(jnp.zeros((1, 4, 2, 4)), jnp.zeros((1, 4, 2, 4)), jnp.zeros((1, 4, 2, 4)), jnp.zeros((1, 3), bool))

"""TNL token mixer (LightningAttention): float64 recomputation of the layer, impls agree, LRPE is relative,
prefill + step decoding equals the parallel forward, hybrid lightning/softmax LM is causal, config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab.attention.config import AttentionConfig
from attnlab.attention.variants.dot_product import DotProductAttention
from attnlab.attention.variants.lightning import LightningAttention, LightningConfig
from attnlab.model.config import ModelConfig
from attnlab.model.lm import DecoderLM
from tests.ref_lightning import lightning_ref

D_MODEL, T = 32, 21


def _module(**kw):
  cfg = LightningConfig(num_heads=4, block_size=8, **kw)
  return LightningAttention(cfg, D_MODEL, rngs=nnx.Rngs(0))


def _x(b=2, t=T, seed=1):
  x = jax.random.normal(jax.random.key(seed), (b, t, D_MODEL))
  return x, jnp.broadcast_to(jnp.arange(t), (b, t))


def test_layer_matches_float64_recomputation():
  m = _module(decay="tnl", layer=1, num_layers=3)
  x, pos = _x()
  y, _ = m(x, positions=pos)
  with jax.enable_x64(True):
    x64 = jnp.asarray(np.asarray(x), jnp.float64)
    w = jnp.asarray(np.asarray(m.qkvu.kernel[...]), jnp.float64)
    q, k, v, u = jnp.split(x64 @ w, 4, axis=-1)
    split = lambda z: z.reshape(2, T, 4, 8)
    lam = np.exp(-np.asarray(LightningConfig(num_heads=4, layer=1, num_layers=3).log_decay()))
    o = lightning_ref(split(jax.nn.silu(q)), split(jax.nn.silu(k)), split(v), lam).reshape(2, T, 32)
    o = o / jnp.sqrt(jnp.mean(o * o, axis=-1, keepdims=True) + 1e-6)
    want = (u * o) @ jnp.asarray(np.asarray(m.out.kernel[...]), jnp.float64)
    np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-5)


def test_impls_agree_and_internals():
  x, pos = _x()
  ys = {}
  for impl in ("chunked", "naive", "pallas"):
    m = _module(impl=impl, lrpe=True)
    ys[impl], aux = m(x, positions=pos, return_internals=True)
  np.testing.assert_allclose(ys["chunked"], ys["naive"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ys["pallas"], ys["naive"], rtol=1e-4, atol=1e-5)
  assert aux["weights"].shape == (2, 4, T, T) and aux["queries"].shape == (2, T, 4, 16)  # LRPE doubles d
  assert float(jnp.abs(jnp.triu(aux["weights"], 1)).max()) == 0.0


def test_lrpe_is_relative():
  m = _module(lrpe=True)
  x, pos = _x()
  y0, _ = m(x, positions=pos)
  y1, _ = m(x, positions=pos + 57)
  np.testing.assert_allclose(y0, y1, rtol=1e-4, atol=1e-5)
  m_rope = _module(rope=True)  # RoPE on linear attention is not shift-invariant (SiLU before, no softmax)
  assert not np.allclose(m_rope(x, positions=pos)[0], _module()(x, positions=pos)[0])


def test_prefill_then_step_equals_parallel_forward():
  m = _module(lrpe=True)
  x, pos = _x()
  full, _ = m(x, positions=pos)
  p = 11
  y_pre, state = m.prefill(x[:, :p], positions=pos[:, :p], cache=m.init_cache(2, T))
  assert state.state.shape == m.init_cache(2, T).state.shape
  outs = [y_pre]
  for t in range(p, T):
    y_t, state = m.step(x[:, t:t + 1], position=t, cache=state)
    outs.append(y_t)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-4, atol=1e-5)


def test_hybrid_stack_builds_runs_and_is_causal():
  light = LightningConfig(num_heads=4, block_size=8)
  cfg = ModelConfig(d_model=D_MODEL, num_layers=4, attention=(light, light, light, AttentionConfig(num_heads=4)))
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  kinds = [type(b.attn) for b in model.blocks]
  assert kinds == [LightningAttention] * 3 + [DotProductAttention]
  decays = [b.attn.log_decay for b in model.blocks[:3]]
  assert decays[0] > decays[1] > decays[2]  # TNL: deeper layers decay less
  assert [b.attn.cfg.layer for b in model.blocks[:3]] == [0, 1, 2]
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, cfg.vocab_size)
  fwd = nnx.jit(lambda m, t: m(t))
  base = fwd(model, tokens)
  t = 13
  moved = fwd(model, tokens.at[:, t:].set((tokens[:, t:] + 7) % cfg.vocab_size))
  np.testing.assert_allclose(base[:, :t], moved[:, :t], rtol=1e-6, atol=1e-6)
  assert not np.allclose(base[:, t:], moved[:, t:])
  grads = nnx.grad(lambda m: jnp.mean(m(tokens) ** 2))(model)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("field", ["gate", "num_kv_heads", "score", "causal", "qk_norm", "sink_logit"])
def test_config_has_no_softmax_fields(field):
  with pytest.raises(TypeError, match=field):
    LightningConfig(num_heads=4, **{field: None})


@pytest.mark.parametrize("kw, match", [
    (dict(decay="alibi"), "decay"),
    (dict(impl="triton"), "impl"),
    (dict(block_size=0), "block_size"),
    (dict(layer=1), "both"),
    (dict(layer=3, num_layers=3), "layer"),
])
def test_config_validation(kw, match):
  with pytest.raises(ValueError, match=match):
    LightningConfig(num_heads=4, **kw)


def test_packed_segments_and_pallas_refusal():
  x, pos = _x()
  seg = jnp.asarray([[1] * 9 + [2] * 12] * 2)
  y, _ = _module()(x, positions=pos, segment_ids=seg)
  y2, _ = _module(impl="naive")(x, positions=pos, segment_ids=seg)
  np.testing.assert_allclose(y, y2, rtol=1e-4, atol=1e-5)
  y_doc2, _ = _module()(x[:, 9:], positions=pos[:, 9:], segment_ids=seg[:, 9:])
  np.testing.assert_allclose(y[:, 9:], y_doc2, rtol=1e-4, atol=1e-5)  # document 2 alone = document 2 packed
  with pytest.raises(ValueError, match="segment"):
    _module(impl="pallas")(x, positions=pos, segment_ids=seg)

"""Flash kernel API: block-size config errors, attend(impl=...) dispatch, the LM switch, causality, sink mass from
the residual, memory (no q_len x kv_len buffer) and lowering of both kernels for real GPU/TPU targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnlab
from attnlab.attention.config import AttentionConfig
from kernels_pallas.flash import BlockSizes, flash_attention

B, T, H, HKV, D = 1, 32, 4, 2, 16


def _qkv(t=T, d=D, dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, t, H, d)).astype(dtype), jax.random.normal(kk, (B, t, HKV, d)).astype(dtype),
          jax.random.normal(kv, (B, t, HKV, d)).astype(dtype))


def test_block_sizes_errors():
  with pytest.raises(ValueError, match="positive int"):
    BlockSizes(block_q=0)
  with pytest.raises(ValueError, match="block_q=24 does not divide q_len=32"):
    BlockSizes(24, 16).resolve(32, 32, 16, "gpu", interpret=True)
  with pytest.raises(ValueError, match="powers of two"):
    BlockSizes(48, 64).resolve(96, 128, 64, "gpu", interpret=False)
  with pytest.raises(ValueError, match="multiples of 128"):
    BlockSizes(128, 64).resolve(256, 256, 128, "tpu", interpret=False)
  with pytest.raises(ValueError, match="backend"):
    BlockSizes().resolve(32, 32, 16, "cuda", interpret=True)
  assert BlockSizes(128, 128).resolve(32, 64, 16, "gpu", interpret=True) == BlockSizes(32, 64, 32, 64)


def test_unsupported_calls_are_refused():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="LSSA only"):
    flash_attention(q, k, v, score="softplus", reweight_power=3)
  with pytest.raises(ValueError, match="does not support sink_logits"):
    flash_attention(q, k, v, score="sigmoid", sink_logits=jnp.zeros(H))
  with pytest.raises(ValueError, match="impl='pallas' cannot run this call: a dense bias/mask"):
    attnlab.attend(q, k, v, mask=jnp.ones((T, T), bool), impl="pallas")
  with pytest.raises(ValueError, match="impl must be one of"):
    attnlab.attend(q, k, v, impl="triton")
  with pytest.raises(ValueError, match="impl must be one of"):
    AttentionConfig(impl="triton")
  # "auto" falls back to XLA for what the kernel lacks (and on CPU for everything).
  out = attnlab.attend(q, k, v, score="softplus", reweight_power=3, impl="auto")
  np.testing.assert_array_equal(out, attnlab.attend(q, k, v, score="softplus", reweight_power=3))


def test_attend_pallas_matches_xla_causal_and_sink_mass():
  q, k, v = _qkv()
  sinks = jnp.array([-30.0, 0.0, 3.0, 30.0])
  fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, sink_logits=sinks, block_sizes=BlockSizes(16, 16),
                                               return_residuals=True))
  o, r = fn(q, k, v)
  np.testing.assert_allclose(o, attnlab.attend(q, k, v, sink_logits=sinks), atol=2e-6)
  np.testing.assert_allclose(attnlab.attend(q, k, v, sink_logits=sinks, impl="pallas"), o, atol=1e-6)
  # sink mass without a dense map: exp(sink_h - r_i) == 1 - sum_j p_ij
  w = attnlab.attention_weights(q, k, sink_logits=sinks)
  np.testing.assert_allclose(jnp.exp(sinks[None, :, None] - r), 1.0 - w.sum(-1), atol=2e-6)
  # causality: perturbing the future keys/values leaves the past outputs unchanged (bit-exact)
  t0 = 20
  k2, v2 = k.at[:, t0:].add(5.0), v.at[:, t0:].multiply(-3.0)
  o2, _ = fn(q, k2, v2)
  np.testing.assert_array_equal(o2[:, :t0], o[:, :t0])
  assert not np.allclose(o2[:, t0:], o[:, t0:])


def test_lm_switches_with_one_config_field():
  tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, 259)
  logits = {}
  for impl in ("xla", "pallas"):
    attn = AttentionConfig(num_heads=2, num_kv_heads=1, sink_logit=True, sink_logit_init=2.0, impl=impl)
    model = attnlab.DecoderLM(attnlab.ModelConfig(d_model=32, num_layers=1, attention=attn), rngs=nnx.Rngs(0))
    logits[impl] = model(tokens)
  np.testing.assert_allclose(logits["pallas"], logits["xla"], atol=2e-5)


def test_no_q_by_kv_buffer():
  """Compiled (CPU interpret) fwd+bwd temp memory stays far below one q_len x kv_len float32 map."""
  n = 2048
  spec = jax.ShapeDtypeStruct((1, n, 1, 16), jnp.float32)
  loss = lambda q, k, v: jnp.sum(flash_attention(q, k, v, block_sizes=BlockSizes(64, 64), backend="gpu"))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(spec, spec, spec).lower().compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < n * n * 4 / 8, temp


@pytest.mark.parametrize("backend,platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_lowers_for_hardware(backend, platform):
  """fwd+bwd lower to Triton (cuda) and Mosaic (tpu) IR from CPU; compiling needs the device."""
  q = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((1, 256), jnp.int32)
  sinks = jax.ShapeDtypeStruct((4,), jnp.float32)

  def loss(q, k, v, sinks, seg):
    o = flash_attention(q, k, v, sink_logits=sinks, segment_ids=seg, backend=backend, interpret=False,
                        block_sizes=BlockSizes(64, 128))
    return jnp.sum(o.astype(jnp.float32))

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(q, k, k, sinks, seg).lower(
      lowering_platforms=(platform,))
  text = lowered.as_text()
  assert ("tpu_custom_call" if backend == "tpu" else "xla.gpu.triton") in text

"""The attention module and the decoder LM: causality, sink controls, per-layer patterns, analysis outputs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnlab
from attnlab import AttentionConfig, DecoderLM, ModelConfig
from attnlab.attention.variants.dot_product import DotProductAttention

D_MODEL, SEQ = 32, 10
SCORE_CONFIGS = {
    "softmax": AttentionConfig(num_heads=2),
    "softmax_sink_logit": AttentionConfig(num_heads=2, sink_logit=True),
    "sigmoid": AttentionConfig(num_heads=2, score="sigmoid"),
    "sigmoid_norm": AttentionConfig(num_heads=2, score="sigmoid", score_params={"normalize": True}),
    "softplus": AttentionConfig(num_heads=2, score="softplus", score_params={"reweight_power": 3.0}),
    "softpick": AttentionConfig(num_heads=2, score="softpick"),
    "relu": AttentionConfig(num_heads=2, score="relu", num_kv_heads=1),
}


def tiny_lm(att, **kw):
  cfg = ModelConfig(vocab_size=50, d_model=D_MODEL, num_layers=2, attention=att, **kw)
  return DecoderLM(cfg, rngs=nnx.Rngs(0))


@jax.jit
def forward(model, tokens):
  return model(tokens)


@pytest.mark.parametrize("name", sorted(SCORE_CONFIGS))
def test_lm_is_causal(name):
  model = tiny_lm(SCORE_CONFIGS[name])
  tokens = jax.random.randint(jax.random.key(1), (2, SEQ), 0, 50)
  t = 6
  perturbed = tokens.at[:, t].set((tokens[:, t] + 7) % 50)
  a, b = forward(model, tokens), forward(model, perturbed)
  np.testing.assert_array_equal(np.asarray(a[:, :t]), np.asarray(b[:, :t]))
  assert not np.allclose(a[:, t:], b[:, t:])  # the future does change


OPTIONS = {
    "sink_token": ("sink_key", "sink_value"),
    "key_bias": ("sink_key",),
    "value_bias": ("sink_value",),
    "gate_elementwise": ("gate",),
    "gate_headwise": ("gate",),
    "sink_logit": ("sink_logits",),
}


def option_config(option):
  if option.startswith("gate_"):
    return AttentionConfig(num_heads=2, gate=option[len("gate_"):])
  return AttentionConfig(num_heads=2, **{option: True})


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_sink_options_change_output_and_receive_gradients(option):
  base = DotProductAttention(AttentionConfig(num_heads=2), D_MODEL, rngs=nnx.Rngs(0))
  mod = DotProductAttention(option_config(option), D_MODEL, rngs=nnx.Rngs(0))
  # Same seed -> identical shared projections, so any output difference comes from the option.
  for name in ("q", "k", "v"):
    np.testing.assert_array_equal(getattr(base.qkv, name).kernel[...], getattr(mod.qkv, name).kernel[...])
  if option == "sink_logit":  # a zero sink logit is a real change too (off-by-one), but drive it large
    mod.sink_logits[...] = jnp.array([3.0, -3.0])
  x = jax.random.normal(jax.random.key(2), (2, SEQ, D_MODEL))
  pos = jnp.broadcast_to(jnp.arange(SEQ), (2, SEQ))
  y_base, _ = base(x, positions=pos)
  y, _ = mod(x, positions=pos)
  assert not np.allclose(y, y_base, atol=1e-5)

  def loss(m):
    return jnp.sum(m(x, positions=pos)[0] ** 2)

  grads = nnx.grad(loss)(mod)
  for attr in OPTIONS[option]:
    leaves = jax.tree.leaves(getattr(grads, attr))
    assert leaves and all(float(jnp.abs(g).max()) > 0 for g in leaves), attr


def test_key_bias_only_slot_adds_no_value():
  """With key_bias the slot's value is 0: the output is a down-weighted softmax, never pulled to a learned v."""
  mod = DotProductAttention(AttentionConfig(num_heads=2, key_bias=True), D_MODEL, rngs=nnx.Rngs(0))
  mod.sink_key[...] = jnp.full(mod.sink_key.shape, 5.0)
  x = jax.random.normal(jax.random.key(3), (1, SEQ, D_MODEL))
  _, aux = mod(x, positions=jnp.arange(SEQ)[None], return_internals=True)
  np.testing.assert_allclose(aux["weights"].sum(-1) + aux["sink_mass"], 1.0, atol=1e-5)
  assert float(aux["sink_mass"].mean()) > 0.01


def test_internals_shapes_and_sink_mass():
  model = tiny_lm(AttentionConfig(num_heads=2, num_kv_heads=1, sink_logit=True))
  tokens = jnp.zeros((2, SEQ), jnp.int32)
  logits, aux = model(tokens, return_internals=True)
  assert logits.shape == (2, SEQ, 50)
  assert len(aux["hidden"]) == 3 and len(aux["layers"]) == 2
  layer = aux["layers"][0]
  assert layer["weights"].shape == (2, 2, SEQ, SEQ)
  assert layer["values"].shape == (2, SEQ, 1, D_MODEL // 2)
  np.testing.assert_allclose(layer["weights"].sum(-1) + layer["sink_mass"], 1.0, atol=1e-5)
  np.testing.assert_array_equal(model(tokens), logits)  # internals don't change the result


def test_per_layer_attention_pattern():
  soft, sig = AttentionConfig(num_heads=2), AttentionConfig(num_heads=2, score="sigmoid")
  cfg = ModelConfig(vocab_size=50, d_model=D_MODEL, num_layers=4, attention=(sig, sig, sig, soft))
  assert [cfg.layer_attention(i).score for i in range(4)] == ["sigmoid", "sigmoid", "sigmoid", "softmax"]
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  assert [b.attn.cfg.score for b in model.blocks] == ["sigmoid", "sigmoid", "sigmoid", "softmax"]
  with pytest.raises(ValueError, match="does not divide num_layers"):
    ModelConfig(num_layers=4, attention=(soft, sig, sig))


def test_segment_ids_isolate_packed_documents():
  model = tiny_lm(AttentionConfig(num_heads=2))
  tokens = jax.random.randint(jax.random.key(4), (1, SEQ), 0, 50)
  seg = jnp.array([[0] * 4 + [1] * 6])
  pos = jnp.array([list(range(4)) + list(range(6))])
  packed = model(tokens, positions=pos, segment_ids=seg)
  alone = model(tokens[:, 4:])
  np.testing.assert_allclose(packed[:, 4:], alone, atol=1e-5)


def test_config_errors():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    AttentionConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="gate must be one of"):
    AttentionConfig(gate="channel")
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    tiny_lm(AttentionConfig(num_heads=3))
  with pytest.raises(ValueError, match="sink_logit needs a score with sink logits"):
    tiny_lm(AttentionConfig(num_heads=2, score="sigmoid", sink_logit=True))
  with pytest.raises(ValueError, match="unknown score function"):
    tiny_lm(AttentionConfig(num_heads=2, score="nope"))(jnp.zeros((1, 4), jnp.int32))
  model = tiny_lm(AttentionConfig(num_heads=2), max_seq_len=8)
  with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
    model(jnp.zeros((1, 9), jnp.int32))


def test_score_params_accept_mappings_and_are_hashable():
  a = AttentionConfig(score="sigmoid", score_params={"normalize": True, "b": 0.0})
  b = dataclasses.replace(a)
  assert a.score_params == (("b", 0.0), ("normalize", True)) and hash(a) == hash(b)
  assert attnlab.attention_kinds()[0]

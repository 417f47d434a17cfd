"""The cache protocol (attnlab.attention.cache): prefill + steps equal the forward for every variant and the LM,
prefix consistency with default configs, sliding-window caches, policies and their errors, cache pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnlab
from attnlab.attention.cache import CachePolicy, parse_policy
from attnlab.attention.registry import attention_module_for
from attnlab.attention.variants.cca import CCAConfig
from attnlab.attention.variants.landmark import LandmarkConfig
from attnlab.attention.variants.lightning import LightningConfig
from attnlab.attention.variants.meta_tokens import MetaTokenConfig
from attnlab.attention.variants.routing import RoutingConfig
from attnlab.inference import cache_shardings

T, V, LM_ID = 18, 31, 30  # sequence length, vocabulary, the landmark / meta token id

VARIANTS = {
    "softmax": attnlab.AttentionConfig(num_heads=4),
    "gqa_qknorm_sinklogit_gate": attnlab.AttentionConfig(num_heads=4, num_kv_heads=2, qk_norm=True, sink_logit=True,
                                                         sink_logit_init=0.5, gate="elementwise"),
    "sigmoid_sinktoken": attnlab.AttentionConfig(num_heads=4, score="sigmoid", sink_token=True),
    "softpick_kvbias_headgate": attnlab.AttentionConfig(num_heads=4, score="softpick", key_bias=True,
                                                        value_bias=True, gate="headwise"),
    "relu_nope": attnlab.AttentionConfig(num_heads=4, score="relu", rope=False),
    "window_sinklogit": attnlab.AttentionConfig(num_heads=4, window=5, sink_logit=True),
    "window_sinktoken_gqa": attnlab.AttentionConfig(num_heads=4, num_kv_heads=2, window=4, sink_token=True),
    "cca": CCAConfig(num_heads=4, num_kv_heads=2, group_size=2, window_size=4, block_q=8),
    "lightning": LightningConfig(num_heads=4, block_size=4, lrpe=True),
    "meta_tokens": MetaTokenConfig(num_heads=4, meta_ids=(LM_ID,), meta_capacity=3),
    "meta_tokens_all": MetaTokenConfig(num_heads=4, meta_ids=(LM_ID,), meta_mode="all"),
    "routing": RoutingConfig(num_heads=4, num_clusters=3, window=3, local_block=4),
    "landmark": LandmarkConfig(num_heads=4, num_kv_heads=2, block_size=4, landmark_id=LM_ID, top_k=8,
                               cache_blocks=8),
}


def lm(att, *, layers=2, max_seq_len=T, **kw):
  cfg = attnlab.ModelConfig(vocab_size=V, d_model=32, num_layers=layers, max_seq_len=max_seq_len, attention=att, **kw)
  model = attnlab.DecoderLM(cfg, rngs=nnx.Rngs(0))
  model.eval()
  return model


def tokens_for(att, batch=2, seq=T, seed=1):
  toks = jax.random.randint(jax.random.key(seed), (batch, seq), 0, LM_ID)  # LM_ID only where placed below
  if isinstance(att, MetaTokenConfig):
    toks = toks.at[:, ::3].set(LM_ID)
  if isinstance(att, LandmarkConfig):
    toks = toks.at[:, att.block_size - 1::att.block_size].set(LM_ID)
  return toks


def decode(model, toks, prefix, policy="full", max_len=None):
  """Logits (batch, seq, vocab): ``prefix`` tokens prefilled, the rest one jitted step each."""
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda s, tok, pos, c: nnx.merge(graphdef, s).step(tok, position=pos, cache=c))
  cache = model.init_cache(toks.shape[0], max_len or toks.shape[1], policy=policy)
  logits, cache = model.prefill(toks[:, :prefix], cache=cache)
  out = [logits]
  for t in range(prefix, toks.shape[1]):
    lt, cache = step(state, toks[:, t], jnp.int32(t), cache)
    out.append(lt[:, None])
  return jnp.concatenate(out, axis=1)


def assert_rel(got, want, rtol=1e-5, msg=""):
  err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
  assert err <= rtol, f"{msg} relative error {err:.2e}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prefill_then_steps_equal_forward(name):
  att = VARIANTS[name]
  model, toks = lm(att), tokens_for(att)
  assert_rel(decode(model, toks, prefix=7), model(toks), msg=name)


def test_learned_positions_and_one_token_prompt():
  model = lm(VARIANTS["softmax"], position_embedding="learned")
  toks = tokens_for(VARIANTS["softmax"])
  assert_rel(decode(model, toks, prefix=1), model(toks))


def _layer(att, d=32):
  m = attention_module_for(att)(att, d, rngs=nnx.Rngs(0))
  if hasattr(m, "deterministic"):
    m.eval()
  return m


@pytest.mark.parametrize("att", [attnlab.AttentionConfig(), attnlab.AttentionConfig(score="sigmoid"), CCAConfig(),
                                 LightningConfig(), MetaTokenConfig(), RoutingConfig(), LandmarkConfig()],
                         ids=lambda a: f"{type(a).__name__}_{getattr(a, 'score', '')}")
def test_prefix_consistency_with_default_configs(att):
  """Outputs on x[:, :t] equal the first t outputs on x (so a cache can serve every default config)."""
  n, t = 40, 13
  m = _layer(att)
  x = jax.random.normal(jax.random.key(3), (2, n, 32))
  pos = jnp.broadcast_to(jnp.arange(n), (2, n))
  extra = lambda k: {"tokens": tokens_for(att, seq=n)[:, :k]} if getattr(m, "needs_tokens", False) else {}
  full, _ = m(x, positions=pos, **extra(n))
  part, _ = m(x[:, :t], positions=pos[:, :t], **extra(t))
  assert_rel(part, full[:, :t], rtol=2e-6)


def test_sigmoid_bias_is_fixed_by_the_config():
  att = attnlab.AttentionConfig(score="sigmoid")
  assert att.score_kwargs["b"] == pytest.approx(-np.log(4096))
  model = lm(att, max_seq_len=64)
  assert model.blocks[0].attn.cfg.score_kwargs["b"] == pytest.approx(-np.log(64))
  explicit = attnlab.AttentionConfig(score="sigmoid", score_params={"b": 0.0})
  assert lm(explicit).blocks[0].attn.cfg.score_kwargs == {"b": 0.0}


def test_window_policy_equals_a_windowed_forward():
  """'window:W' on a full-attention model = the same weights with AttentionConfig(window=W) (a ring cache of W)."""
  w = 4
  model, windowed = lm(VARIANTS["softmax"]), lm(attnlab.AttentionConfig(num_heads=4, window=w))
  toks = tokens_for(VARIANTS["softmax"])
  want = windowed(toks)
  assert_rel(decode(model, toks, prefix=9, policy=f"window:{w}"), want)
  cache = model.init_cache(2, T, policy=f"window:{w}")
  assert cache.layers[0].keys.shape[1] == w
  assert float(jnp.abs(want - model(toks)).max()) > 1e-3  # the window matters


def test_sink_policy_prefill_equals_token_by_token():
  """A sink + window prompt prefill (one masked call without position shift, a scan with it) = feeding it token by
  token, which tests/test_streaming.py checks against a forward over exactly the kept tokens."""
  model, toks = lm(VARIANTS["gqa_qknorm_sinklogit_gate"]), tokens_for(VARIANTS["softmax"])
  for policy in (CachePolicy(2, 5), CachePolicy(2, 5, pos_shift=False)):
    assert_rel(decode(model, toks, prefix=12, policy=policy), decode(model, toks, prefix=1, policy=policy),
               msg=policy.name)


def test_policy_parsing_and_errors():
  assert parse_policy("full").is_full
  assert parse_policy("window:8") == CachePolicy(0, 8)
  assert parse_policy("sink:4+60") == CachePolicy(4, 60)
  for bad in ("sink:4", "window:0", "window:-1", "ring:4", "sink:a+b", 7):
    with pytest.raises(ValueError, match="cache_policy must be|window must be"):
      parse_policy(bad)
  model = lm(VARIANTS["softmax"])
  toks = tokens_for(VARIANTS["softmax"])
  with pytest.raises(ValueError, match="the prompt has 18 tokens but the cache's max_len is 10"):
    model.prefill(toks, cache=model.init_cache(2, 10))
  _, cache = model.prefill(toks[:, :4], cache=model.init_cache(2, 10))
  with pytest.raises(ValueError, match=r"step position 10 is outside the cache \(max_len=10\)"):
    model.step(toks[:, 0], position=10, cache=cache)
  with pytest.raises(ValueError, match="layer 0: cache_policy='sink:2\\+4' cannot serve a cca layer"):
    lm(VARIANTS["cca"]).init_cache(1, T, policy="sink:2+4")
  with pytest.raises(ValueError, match="cannot serve a lightning layer"):
    lm(VARIANTS["lightning"]).init_cache(1, T, policy="window:4")
  with pytest.raises(ValueError, match="AttentionConfig.window=5"):
    lm(VARIANTS["window_sinklogit"]).init_cache(1, T, policy="sink:1+4")
  with pytest.raises(ValueError, match="routing='balanced' cannot be decoded"):
    lm(RoutingConfig(num_heads=4, routing="balanced")).init_cache(1, T)
  learned = lm(VARIANTS["softmax"], position_embedding="learned")
  with pytest.raises(ValueError, match="learned absolute position embeddings"):
    learned.init_cache(1, T, policy="sink:2+4")
  with pytest.raises(ValueError, match="max_len=19 exceeds max_seq_len=18"):
    learned.init_cache(1, T + 1)
  with pytest.raises(ValueError, match="max_len must be a positive int"):
    model.init_cache(1, 0)


def test_caches_are_pytrees_with_logical_axes():
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
  for name in ("gqa_qknorm_sinklogit_gate", "cca", "lightning", "meta_tokens", "routing", "landmark"):
    cache = lm(VARIANTS[name]).init_cache(2, T)
    leaves = jax.tree.leaves(cache)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
    shardings = cache_shardings(cache, mesh)
    assert len(jax.tree.leaves(shardings)) == len(leaves), name
    again = jax.tree.unflatten(jax.tree.structure(cache), [np.asarray(x) for x in leaves])  # e.g. a checkpoint
    assert jax.tree.structure(again) == jax.tree.structure(cache)
    jax.device_put(cache, shardings)

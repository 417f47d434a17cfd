"""StreamingLLM cache + streaming eval: equals the full forward when nothing is evicted, and equals a forward over
exactly the kept tokens (at cache positions) for a 1-layer model, whose keys/values depend only on the token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnlab
from attnlab.streaming import KVCache, StreamingPolicy, insert, stream_logits, streaming_perplexity

T = 24


def _model(num_layers=2, **att):
  att = dict(num_heads=4, **att)
  cfg = attnlab.ModelConfig(vocab_size=31, d_model=32, num_layers=num_layers, max_seq_len=T,
                            attention=attnlab.AttentionConfig(**att))
  return attnlab.DecoderLM(cfg, rngs=nnx.Rngs(0))


def _tokens(batch=2, seq=T):
  return jax.random.randint(jax.random.key(1), (batch, seq), 0, 31)


@pytest.mark.parametrize("att", [
    dict(),
    dict(num_kv_heads=2, qk_norm=True, sink_logit=True, sink_logit_init=0.5),
    dict(sink_token=True, gate="headwise"),
    dict(key_bias=True, rope=False),
])
def test_no_eviction_equals_full_forward(att):
  model = _model(**att)
  tokens = _tokens()
  full = model(tokens)
  for policy in (StreamingPolicy(0, T), StreamingPolicy(4, T), StreamingPolicy(2, T, pos_shift=False)):
    np.testing.assert_allclose(stream_logits(model, tokens, policy), full, atol=2e-5, rtol=2e-5)


def _kept(t, policy):
  if t + 1 <= policy.capacity:
    return list(range(t + 1))
  return list(range(policy.n_sink)) + list(range(t + 1 - policy.window, t + 1))


@pytest.mark.parametrize("policy", [StreamingPolicy(2, 6), StreamingPolicy(0, 5), StreamingPolicy(1, 4, False)])
def test_eviction_matches_forward_on_kept_tokens(policy):
  model = _model(num_layers=1, sink_logit=True)
  tokens = _tokens()
  streamed = stream_logits(model, tokens, policy)
  for t in (0, policy.capacity - 1, policy.capacity, policy.capacity + 3, T - 1):
    kept = _kept(t, policy)
    pos = jnp.arange(len(kept)) if policy.pos_shift else jnp.asarray(kept)
    ref = model(tokens[:, kept], positions=jnp.broadcast_to(pos, (2, len(kept))))[:, -1]
    np.testing.assert_allclose(streamed[:, t], ref, atol=2e-5, rtol=2e-5, err_msg=f"t={t}")


def test_eviction_changes_the_result():
  model = _model()
  tokens = _tokens()
  diff = jnp.abs(stream_logits(model, tokens, StreamingPolicy(2, 6)) - model(tokens)).max(-1)
  assert float(diff[:, :8].max()) < 1e-4  # nothing evicted yet
  assert float(diff[:, 8:].min()) > 1e-4  # evicted


def test_insert_keeps_sinks_and_recent():
  policy = StreamingPolicy(2, 3)
  cache = KVCache.empty(policy, 1, 1, 1)
  for t in range(9):
    x = jnp.full((1, 1, 1, 1), float(t))
    cache = insert(cache, x, -x, t, policy)
  np.testing.assert_array_equal(cache.keys[0, :, 0, 0], [0, 1, 6, 7, 8])
  np.testing.assert_array_equal(cache.values[0, :, 0, 0], [0, -1, -6, -7, -8])
  np.testing.assert_array_equal(cache.positions, [0, 1, 6, 7, 8])
  assert int(cache.length) == 5


def test_perplexity_table_and_errors():
  model = _model()
  res = streaming_perplexity(model, _tokens(), {"window": StreamingPolicy(0, 8), "sink": StreamingPolicy(2, 6)})
  assert set(res) == {"full", "window", "sink"}
  assert all(r["ppl"] > 1 for r in res.values())
  long = streaming_perplexity(model, _tokens(seq=T + 4), {"sink": StreamingPolicy(2, 6)})
  assert long["full"]["ppl"] is None
  with pytest.raises(ValueError, match="softmax"):
    stream_logits(_model(score="sigmoid"), _tokens(), StreamingPolicy(1, 4))
  with pytest.raises(ValueError, match="window"):
    StreamingPolicy(1, 0)


def test_learned_positions_are_used_and_refused_by_streaming():
  cfg = attnlab.ModelConfig(vocab_size=31, d_model=32, num_layers=1, max_seq_len=T, position_embedding="learned",
                            attention=attnlab.AttentionConfig(num_heads=4, rope=False))
  model = attnlab.DecoderLM(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens()
  shifted = model(tokens, positions=jnp.broadcast_to(jnp.arange(T)[::-1], tokens.shape))
  assert float(jnp.abs(model(tokens) - shifted).max()) > 1e-3
  with pytest.raises(ValueError, match="learned absolute"):
    stream_logits(model, tokens, StreamingPolicy(1, 4))
  with pytest.raises(ValueError, match="position_embedding"):
    attnlab.ModelConfig(position_embedding="sinusoidal")

"""attnlab.generate: greedy generation with the cache equals re-running the forward each step, one compilation of
the step per generation, sampling controls, cache policies and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnlab
from attnlab.data.landmark import insert_landmarks
from attnlab.inference import TRACE_COUNTS
from tests.test_cache import LM_ID, VARIANTS, lm, tokens_for

N = 6  # new tokens


def greedy_by_forward(model, prompt, n, *, landmark=None):
  """The reference: the whole sequence through the forward at every step (landmarks inserted, never sampled)."""
  seq = np.asarray(prompt)
  out = []
  for _ in range(n):
    if landmark is None:
      logits = model(jnp.asarray(seq))[:, -1]
    else:  # the prediction at the last ordinary token (insert_landmarks may close a block after it)
      stream, is_lm = insert_landmarks(seq, landmark.landmark_id, landmark.block_size)
      logits = model(jnp.asarray(stream))[:, np.flatnonzero(~is_lm)[-1]]
      logits = logits.at[:, landmark.landmark_id].set(-jnp.inf)
    tok = np.asarray(jnp.argmax(logits, -1))[:, None]
    out.append(tok)
    seq = np.concatenate([seq, tok], 1)
  return np.concatenate(out, 1)


@pytest.mark.parametrize("name", ["gqa_qknorm_sinklogit_gate", "sigmoid_sinktoken", "window_sinklogit"] + [
    pytest.param(n, marks=pytest.mark.slow)  # their caches: tests/test_cache.py (prefill + steps = forward)
    for n in ("cca", "lightning", "routing", "meta_tokens", "landmark")])
def test_greedy_generation_equals_rerunning_the_forward(name):
  att = VARIANTS[name]
  model = lm(att, max_seq_len=24)
  landmark = att if name == "landmark" else None
  prompt = np.asarray(tokens_for(attnlab.AttentionConfig(), seq=7))  # plain tokens (no LM_ID)
  got = np.asarray(attnlab.generate(model, prompt, N))
  np.testing.assert_array_equal(got, greedy_by_forward(model, prompt, N, landmark=landmark))
  assert name != "landmark" or not np.any(got == LM_ID)  # landmarks are inserted, never sampled


def test_one_step_compilation_per_generation():
  model = lm(VARIANTS["softmax"], max_seq_len=32)
  prompt = tokens_for(VARIANTS["softmax"], seq=5)
  before = TRACE_COUNTS["step"]
  attnlab.generate(model, prompt, 12)
  assert TRACE_COUNTS["step"] - before == 1  # 11 steps, one trace
  attnlab.generate(model, prompt, 12, seed=5)  # same shapes: no new trace
  assert TRACE_COUNTS["step"] - before == 1


def test_sampling_controls():
  model = lm(VARIANTS["softmax"], max_seq_len=32)
  prompt = tokens_for(VARIANTS["softmax"], seq=5)
  a = attnlab.generate(model, prompt, N, temperature=1.0, seed=1)
  np.testing.assert_array_equal(a, attnlab.generate(model, prompt, N, temperature=1.0, seed=1))
  assert not np.array_equal(a, attnlab.generate(model, prompt, N, temperature=1.0, seed=2))
  np.testing.assert_array_equal(attnlab.generate(model, prompt, N, temperature=0.7, top_k=1),
                                attnlab.generate(model, prompt, N))
  one = attnlab.generate(model, prompt[0], N)  # a 1-D prompt is one stream
  np.testing.assert_array_equal(one[0], attnlab.generate(model, prompt, N)[0])


def test_window_and_sink_policies():
  w = 4
  model, windowed = lm(VARIANTS["softmax"]), lm(attnlab.AttentionConfig(num_heads=4, window=w))
  prompt = np.asarray(tokens_for(VARIANTS["softmax"], seq=7))
  np.testing.assert_array_equal(attnlab.generate(model, prompt, N, cache_policy=f"window:{w}"),
                                greedy_by_forward(windowed, prompt, N))
  long = attnlab.generate(model, prompt, 30, cache_policy="sink:2+6")  # beyond max_seq_len=18 with RoPE: fine
  assert long.shape == (2, 30)


def test_input_errors():
  model = lm(VARIANTS["softmax"], position_embedding="learned")
  prompt = tokens_for(VARIANTS["softmax"], seq=5)
  with pytest.raises(ValueError, match="cache_policy must be"):
    attnlab.generate(model, prompt, 2, cache_policy="sink:4")
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    attnlab.generate(model, prompt, 2, temperature=-1.0)
  with pytest.raises(ValueError, match="top_k must be None or an int"):
    attnlab.generate(model, prompt, 2, top_k=0)
  with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
    attnlab.generate(model, prompt, 0)
  with pytest.raises(ValueError, match="max_len=19 exceeds max_seq_len=18"):
    attnlab.generate(model, prompt, 15)
  with pytest.raises(ValueError, match="need 12 positions but max_len=10"):
    attnlab.generate(model, prompt, 8, max_len=10)
  with pytest.raises(ValueError, match="prompt must be"):
    attnlab.generate(model, np.zeros((1, 2, 3), np.int32), 2)
  with pytest.raises(ValueError, match="cannot serve a cca layer"):
    attnlab.generate(lm(VARIANTS["cca"]), prompt, 2, cache_policy="window:4")

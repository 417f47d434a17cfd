"""Landmark attention: grouped softmax vs a float64 dense reference, retrieval inference vs training forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab.attention import attend
from attnlab.attention.landmark import init_cache, landmark_attention
from attnlab.attention.landmark.grouped_softmax import grouped_softmax_weights, landmark_logits
from attnlab.attention.landmark.retrieval import _update_cache
from attnlab.eval.landmark_runner import LandmarkRunner, max_chunk_len
from attnlab.attention.variants.landmark import LandmarkConfig
from attnlab.data.landmark import insert_landmarks
from attnlab.model.config import ModelConfig
from attnlab.model.lm import DecoderLM
from tests.ref_landmark import ref_landmark_attention

B, N, H, HKV, D = 2, 24, 4, 2, 8


def _qkv(seed):
  r = np.random.default_rng(seed)
  return (r.normal(size=(B, N, H, D)), r.normal(size=(B, N, HKV, D)), r.normal(size=(B, N, HKV, D)),
          r.normal(size=(B, N, H, D)))


def _layouts():
  aligned = np.zeros((B, N), bool)
  aligned[:, 4::5] = True  # block size 5 from position 0
  rnd = np.zeros((B, N), bool)
  rnd[0, 2::6] = True  # block size 6, random offset
  rnd[1, [0, 3, 4, 11, 19]] = True  # irregular, incl. a landmark opening the row and two in a row
  return {"aligned": aligned, "random_offset": rnd}


def _loss(fn):
  return lambda q, k, v, mem, proj, seg: jnp.sum(fn(q, k, v, mem, seg) * proj)


_fast = lambda q, k, v, mem, seg: landmark_attention(q, k, v, mem, segment_ids=seg)
_fast_vg = jax.jit(jax.value_and_grad(_loss(_fast), argnums=(0, 1, 2)))
_ref = lambda q, k, v, mem, seg: ref_landmark_attention(q, k, v, mem, segment_ids=seg)
_ref_vg = jax.jit(jax.value_and_grad(_loss(_ref), argnums=(0, 1, 2)))


@pytest.mark.parametrize("layout", ["aligned", "random_offset", "segments"])
def test_forward_and_gradient_match_reference(layout):
  q, k, v, proj = _qkv(0)
  mem = _layouts()["aligned" if layout == "aligned" else "random_offset"]
  seg = np.repeat(np.array([[0] * 10 + [1] * 14]), B, 0) if layout == "segments" else np.zeros((B, N), np.int32)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  o = _fast(f32(q), f32(k), f32(v), jnp.asarray(mem), jnp.asarray(seg))
  val, grads = _fast_vg(f32(q), f32(k), f32(v), jnp.asarray(mem), f32(proj), jnp.asarray(seg))
  with jax.enable_x64(True):
    o_ref = _ref(q, k, v, jnp.asarray(mem), jnp.asarray(seg))
    val_ref, grads_ref = _ref_vg(q, k, v, jnp.asarray(mem), jnp.asarray(proj), jnp.asarray(seg))
  np.testing.assert_allclose(o, o_ref, atol=2e-5)
  np.testing.assert_allclose(val, val_ref, rtol=1e-4)
  for g, gr in zip(grads, grads_ref):
    np.testing.assert_allclose(g, gr, atol=1e-4)
    assert np.all(np.isfinite(g))


def test_weights_invariants():
  q, k, _, _ = _qkv(1)
  mem = _layouts()["random_offset"]
  s = landmark_logits(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32))
  w = np.asarray(grouped_softmax_weights(s, jnp.asarray(mem), jnp.arange(N)))
  assert np.all(w[:, :, :, mem[0]][0] == 0) and np.all(w[1][:, :, mem[1]] == 0)  # landmark values never read
  rows = w.sum(-1)
  np.testing.assert_allclose(rows[0], 1.0, atol=1e-5)  # regular blocks: rows sum to 1
  # Row 1 opens with a landmark (query 0 has no candidate -> zero row) and has an empty block (landmarks 3, 4):
  # its gate mass goes nowhere, as in the reference grouped softmax.
  assert np.all(rows[1, :, 0] == 0) and np.all(rows[1] <= 1 + 1e-5)
  assert np.all(np.triu(w, 1) == 0)  # causal


def test_reduces_to_causal_softmax_without_landmarks():
  q, k, v, _ = (jnp.asarray(x, jnp.float32) for x in _qkv(2))
  o = _fast(q, k, v, jnp.zeros((B, N), bool), None)
  np.testing.assert_allclose(o, attend(q, k, v, causal=True), atol=1e-5)


def test_causality():
  q, k, v, _ = (jnp.asarray(x, jnp.float32) for x in _qkv(3))
  mem = jnp.asarray(_layouts()["random_offset"])
  t = 13
  bump = lambda x: x.at[:, t:].add(3.0)
  o1 = _fast(q, k, v, mem, None)
  o2 = _fast(bump(q), bump(k), bump(v), mem.at[:, t + 2].set(True), None)
  np.testing.assert_array_equal(o1[:, :t], o2[:, :t])
  assert not np.allclose(o1[:, t:], o2[:, t:])


def test_update_cache_ring_buffer_and_tail():
  blk, cap = 4, 3
  stream = np.random.default_rng(4).normal(size=(1, 40, 1, 2)).astype(np.float32)
  cache, start = init_cache(1, cap, blk, 1, 2), 0
  upd = jax.jit(_update_cache, static_argnums=4)
  for t in (3, 1, 6, 2, 9, 1, 5, 13):  # chunks cross block boundaries at every phase
    cache = upd(cache, jnp.asarray(stream[:, start:start + t]), jnp.asarray(stream[:, start:start + t]),
                jnp.int32(start), blk)
    start += t
    n_blocks, p = divmod(start, blk)
    for g in range(max(0, n_blocks - cap), n_blocks):
      np.testing.assert_array_equal(cache.keys[0, g % cap], stream[0, g * blk:(g + 1) * blk])
    np.testing.assert_array_equal(cache.tail_keys[0, :p], stream[0, n_blocks * blk:start])


def _model(block, top_k, cache_blocks, layers=2):
  att = LandmarkConfig(num_heads=4, num_kv_heads=2, block_size=block, landmark_id=39, top_k=top_k,
                       cache_blocks=cache_blocks)
  return DecoderLM(ModelConfig(vocab_size=40, d_model=32, num_layers=layers, attention=att), rngs=nnx.Rngs(0))


_full = nnx.jit(lambda m, x: m(x))


def test_retrieval_with_all_blocks_equals_training_forward():
  block = 5
  model = _model(block, top_k=8, cache_blocks=8)
  toks = np.random.default_rng(5).integers(0, 39, (2, 27))  # 34 stream tokens, 6 complete blocks
  stream, is_lm = insert_landmarks(toks, 39, block)
  full = np.asarray(_full(model, jnp.asarray(stream)))[:, ~is_lm]
  runner = LandmarkRunner(model, chunk_len=7)  # chunks start at every phase of the block grid
  np.testing.assert_allclose(runner.score(toks), full, atol=2e-5)
  # Fewer retrieved blocks than cached, and a cache size limit: still finite, and different from full attention.
  small = LandmarkRunner(model, chunk_len=7, top_k=1, cache_blocks=2, selection="max_over_heads")
  got = np.asarray(small.score(toks))
  assert np.all(np.isfinite(got)) and not np.allclose(got, full, atol=1e-4)
  np.testing.assert_allclose(got[:, :9], full[:, :9], atol=2e-5)  # before 2 blocks are complete nothing differs


def test_data_transforms():
  out, is_lm = insert_landmarks(np.arange(1, 8), 0, 3)
  np.testing.assert_array_equal(out, [1, 2, 0, 3, 4, 0, 5, 6, 0, 7])
  np.testing.assert_array_equal(is_lm, out == 0)
  out, _ = insert_landmarks(np.arange(1, 5), 0, 3, phase=1)
  np.testing.assert_array_equal(out, [1, 0, 2, 3, 0, 4])


def test_config_and_input_errors():
  with pytest.raises(TypeError, match="score"):
    LandmarkConfig(score="sigmoid")
  with pytest.raises(ValueError, match="impl"):
    LandmarkConfig(impl="pallas")
  with pytest.raises(ValueError, match="top_k"):
    LandmarkConfig(top_k=5, cache_blocks=4)
  with pytest.raises(ValueError, match="block_size"):
    insert_landmarks(np.arange(3), 0, 1)
  with pytest.raises(ValueError, match="is_landmark"):
    landmark_attention(jnp.zeros((1, 4, 2, 4)), jnp.zeros((1, 4, 2, 4)), jnp.zeros((1, 4, 2, 4)),
                       jnp.zeros((1, 5), bool))
  assert max_chunk_len(512, 51, 2) == 510 - 153
  with pytest.raises(ValueError, match="too large"):
    max_chunk_len(64, 16, 4)


@pytest.mark.slow
def test_generate_matches_full_forward_greedy():
  block = 4
  model = _model(block, top_k=8, cache_blocks=8)
  prompt = np.random.default_rng(6).integers(0, 39, (1, 9))
  got = LandmarkRunner(model, chunk_len=5).generate(prompt, 5)
  seq = list(prompt[0])
  for _ in range(5):
    stream, is_lm = insert_landmarks(np.array(seq), 39, block)
    logits = model(jnp.asarray(stream)[None])[0][~is_lm]
    seq.append(int(jnp.argmax(logits[-1].at[39].set(-jnp.inf))))
  np.testing.assert_array_equal(got[0], seq[9:])


def test_runner_adds_learned_position_embeddings():
  """The runner decodes through DecoderLM.prefill, so a model with learned absolute positions scores as its forward."""
  att = LandmarkConfig(num_heads=4, block_size=5, landmark_id=39, top_k=8, cache_blocks=8)
  model = DecoderLM(ModelConfig(vocab_size=40, d_model=32, num_layers=1, attention=att, max_seq_len=64,
                                position_embedding="learned"), rngs=nnx.Rngs(0))
  toks = np.random.default_rng(7).integers(0, 39, (1, 20))
  stream, is_lm = insert_landmarks(toks, 39, 5)
  full = np.asarray(_full(model, jnp.asarray(stream)))[:, ~is_lm]
  np.testing.assert_allclose(LandmarkRunner(model, chunk_len=7).score(toks), full, atol=2e-5)

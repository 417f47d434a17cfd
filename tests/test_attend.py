"""attnlab.attend vs the naive float64 reference: every score function, forward and gradient."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnlab
from tests.reference import dense_mask, reference_attend, relative_error, with_x64

# (id, score, score params, use sink logits)
SCORES = [
    ("softmax", "softmax", {}, False),
    ("softmax_sink", "softmax", {}, True),
    ("sigmoid", "sigmoid", {}, False),
    ("sigmoid_b0", "sigmoid", {"b": 0.0}, False),
    ("sigmoid_norm", "sigmoid", {"normalize": True}, False),
    ("softplus", "softplus", {}, False),
    ("softplus_reweight", "softplus", {"reweight_power": 3.0}, False),
    ("softpick", "softpick", {}, False),
    ("relu", "relu", {}, False),
]
HEADS = [(4, 4), (4, 2)]  # (num_heads, num_kv_heads): MHA, GQA
LENGTHS = [(6, 6), (3, 7)]  # (q_len, kv_len): self-attention, decode-style q_len < kv_len
D = 8
SINKS = np.array([30.0, -30.0, 4.0, -2.0])  # large: a zero sink would hide bugs


def make_inputs(seed, q_len, kv_len, heads, kv_heads, batch=2):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, q_len, heads, D)).astype(np.float32)
  k = rng.normal(size=(batch, kv_len, kv_heads, D)).astype(np.float32)
  v = rng.normal(size=(batch, kv_len, kv_heads, D)).astype(np.float32)
  bias = rng.normal(scale=3.0, size=(batch, heads, q_len, kv_len))
  bias[rng.random(bias.shape) < 0.2] = 30.0  # a few huge logits
  bias[rng.random(bias.shape) < 0.2] = -30.0
  ct = rng.normal(size=(batch, q_len, heads, D)).astype(np.float32)
  return q, k, v, bias.astype(np.float32), ct


def _loss(attend_fn, q, k, v, bias, sinks, ct, **kw):
  out = attend_fn(q, k, v, bias=bias, sink_logits=sinks, **kw)
  return jnp.sum(out * ct), out


@functools.lru_cache(maxsize=None)
def fast_value_and_grad(score, causal, params_items, with_sinks):
  kw = dict(score=score, causal=causal, **dict(params_items))

  def f(q, k, v, bias, sinks, ct):
    return _loss(attnlab.attend, q, k, v, bias, sinks if with_sinks else None, ct, **kw)

  argnums = (0, 1, 2, 3, 4) if with_sinks else (0, 1, 2, 3)
  return jax.jit(jax.value_and_grad(f, argnums=argnums, has_aux=True))


def ref_value_and_grad(score, causal, params, with_sinks, *args):
  kw = dict(score=score, causal=causal, **params)

  def f(q, k, v, bias, sinks, ct):
    return _loss(reference_attend, q, k, v, bias, sinks if with_sinks else None, ct, **kw)

  argnums = (0, 1, 2, 3, 4) if with_sinks else (0, 1, 2, 3)
  args64 = [jnp.asarray(a, jnp.float64) for a in args]
  return jax.value_and_grad(f, argnums=argnums, has_aux=True)(*args64)


@pytest.mark.parametrize("q_len,kv_len", LENGTHS, ids=["self", "decode"])
@pytest.mark.parametrize("heads,kv_heads", HEADS, ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("name,score,params,with_sinks", SCORES, ids=[s[0] for s in SCORES])
def test_matches_reference_forward_and_gradient(name, score, params, with_sinks, causal, heads, kv_heads, q_len,
                                                kv_len):
  q, k, v, bias, ct = make_inputs(hash((name, causal, heads, kv_heads, q_len)) % 2**31, q_len, kv_len, heads,
                                  kv_heads)
  sinks = SINKS[:heads].astype(np.float32)
  (_, out), grads = fast_value_and_grad(score, causal, tuple(sorted(params.items())), with_sinks)(
      q, k, v, bias, sinks, ct)
  (_, ref_out), ref_grads = with_x64(ref_value_and_grad, score, causal, params, with_sinks, q, k, v, bias, sinks, ct)
  assert out.dtype == jnp.float32
  assert relative_error(out, ref_out) < 2e-5, "forward"
  for i, (g, rg) in enumerate(zip(grads, ref_grads)):
    assert np.all(np.isfinite(g)), f"grad {i} not finite"
    assert relative_error(g, rg) < 2e-4, f"gradient w.r.t. argument {i}"


SPLIT_CASES = [(256, 256, {}), (257, 263, {"window": 40}), (256, 256, {"segments": True}), (256, 256, {"sinks": True})]


@pytest.mark.parametrize("q_len,kv_len,extra", SPLIT_CASES, ids=["self", "decode_window", "segments", "sinks"])
def test_causal_split_matches_reference(q_len, kv_len, extra):
  """From CAUSAL_SPLIT_MIN_LEN queries on the dense path computes causal softmax as two query halves."""
  from attnlab.ops.dense import CAUSAL_SPLIT_MIN_LEN
  assert q_len >= CAUSAL_SPLIT_MIN_LEN
  rng = np.random.default_rng(q_len + kv_len)
  q, k, v, _, ct = make_inputs(3, q_len, kv_len, 4, 2)
  kw = {"window": extra.get("window")}
  if extra.get("segments"):
    ids = np.cumsum(rng.random((2, q_len)) < 0.02, axis=1).astype(np.int32)
    kw["segment_ids"] = (ids, ids)
  if extra.get("sinks"):
    kw["sink_logits"] = SINKS.astype(np.float32)

  def loss(fn, q, k, v):
    out = fn(q, k, v, score="softmax", causal=True, **kw)
    return jnp.sum(out * ct), out

  (_, out), grads = jax.value_and_grad(functools.partial(loss, attnlab.attend), argnums=(0, 1, 2),
                                       has_aux=True)(q, k, v)
  (_, ref), ref_grads = with_x64(lambda *a: jax.value_and_grad(functools.partial(loss, reference_attend),
                                                               argnums=(0, 1, 2), has_aux=True)(
      *[jnp.asarray(x, jnp.float64) for x in a]), q, k, v)
  assert relative_error(out, ref) < 2e-5
  for g, rg in zip(grads, ref_grads):
    assert relative_error(g, rg) < 2e-4


@pytest.mark.parametrize("name,score,params,with_sinks", SCORES, ids=[s[0] for s in SCORES])
def test_masked_keys_get_zero_weight_and_empty_rows_return_zero(name, score, params, with_sinks):
  heads = 4
  q, k, v, bias, ct = make_inputs(7, 5, 5, heads, heads)
  mask = np.ones((2, heads, 5, 5), bool)
  mask[0, 1, 2, :] = False  # an empty row
  mask[1, :, :, 3] = False  # a masked key
  sinks = SINKS[:heads].astype(np.float32) if with_sinks else None
  w = attnlab.attention_weights(q, k, score=score, causal=False, bias=bias, mask=mask, sink_logits=sinks, **params)
  assert np.all(np.asarray(w)[~mask] == 0.0)
  out = attnlab.attend(q, k, v, score=score, causal=False, bias=bias, mask=mask, sink_logits=sinks, **params)
  np.testing.assert_array_equal(np.asarray(out)[0, 2, 1], 0.0)
  # Changing the value of a masked key changes nothing.
  v2 = v.copy()
  v2[1, 3] += 100.0
  out2 = attnlab.attend(q, k, v2, score=score, causal=False, bias=bias, mask=mask, sink_logits=sinks, **params)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
  grads = jax.grad(lambda q, k, v: jnp.sum(attnlab.attend(q, k, v, score=score, causal=False, bias=bias, mask=mask,
                                                          sink_logits=sinks, **params) * ct), argnums=(0, 1, 2))(
                                                              q, k, v)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_softmax_matches_jax_dot_product_attention():
  q, k, v, _, _ = make_inputs(3, 4, 9, 4, 2)
  mask = dense_mask(2, 1, 4, 9, causal=True)
  expected = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask))
  np.testing.assert_allclose(attnlab.attend(q, k, v), expected, atol=2e-6)


def test_sink_logit_zero_is_softmax_off_by_one():
  q, k, v, _, _ = make_inputs(5, 6, 6, 4, 4)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
  s = np.where(dense_mask(2, 4, 6, 6, causal=True), s, -np.inf)
  w = np.exp(s) / (1.0 + np.exp(s).sum(-1, keepdims=True))
  expected = np.einsum("bhqk,bkhd->bqhd", w, v)
  np.testing.assert_allclose(attnlab.attend(q, k, v, sink_logits=np.zeros(4, np.float32)), expected, atol=2e-6)


def test_segment_ids_block_cross_segment_attention():
  q, k, v, _, _ = make_inputs(11, 6, 6, 4, 4)
  seg = np.array([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 2, 2]])
  out = attnlab.attend(q, k, v, segment_ids=seg)
  ref = with_x64(reference_attend, q, k, v, segment_ids=(seg, seg))
  assert relative_error(out, ref) < 2e-5
  # The second segment of row 0 is unaffected by the first.
  v2 = v.copy()
  v2[0, :3] += 10.0
  np.testing.assert_allclose(np.asarray(attnlab.attend(q, k, v2, segment_ids=seg))[0, 3:], np.asarray(out)[0, 3:])


def test_softpick_does_not_overflow():
  q, k, v, _, _ = make_inputs(2, 4, 4, 4, 4)
  bias = np.full((1, 1, 4, 4), 200.0, np.float32)  # exp(200) overflows float32
  out = attnlab.attend(q, k, v, score="softpick", bias=bias)
  assert np.all(np.isfinite(out))


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=(2, 4, 3, 8), k=(2, 4, 2, 8)), "multiple of num_kv_heads"),
    (dict(q=(2, 4, 4, 8), k=(2, 4, 2, 4)), "head_dim mismatch"),
    (dict(q=(2, 4, 32), k=(2, 4, 2, 8)), "rank 4"),
    (dict(q=(2, 4, 4, 8), k=(3, 4, 2, 8)), "batch sizes differ"),
])
def test_bad_shapes_raise_clear_errors(kwargs, match):
  q = jnp.zeros(kwargs["q"])
  k = jnp.zeros(kwargs["k"])
  with pytest.raises(ValueError, match=match):
    attnlab.attend(q, k, k)


def test_bad_arguments_raise_clear_errors():
  q = jnp.zeros((1, 4, 4, 8))
  with pytest.raises(ValueError, match="unknown score function 'softmx'"):
    attnlab.attend(q, q, q, score="softmx")
  with pytest.raises(TypeError, match="unknown parameter"):
    attnlab.attend(q, q, q, score="sigmoid", bais=0.0)
  with pytest.raises(ValueError, match="does not support sink_logits"):
    attnlab.attend(q, q, q, score="sigmoid", sink_logits=jnp.zeros(4))
  with pytest.raises(ValueError, match=r"sink_logits must have shape \(num_heads,\)"):
    attnlab.attend(q, q, q, sink_logits=jnp.zeros(3))
  with pytest.raises(ValueError, match="bias shape"):
    attnlab.attend(q, q, q, bias=jnp.zeros((1, 3, 4, 4)))
  with pytest.raises(ValueError, match="segment_ids"):
    attnlab.attend(q, q, q, segment_ids=jnp.zeros((1, 5), jnp.int32))


# (id, score, params, sinks, per-sequence bias, shared mask, segments, kv heads, q_len, kv_len, chunk); batch 6
CHUNK_CASES = [
    ("softmax_sinks_bias", "softmax", {}, True, True, False, False, 4, 6, 6, 1),
    ("softmax_segments_gqa", "softmax", {}, False, False, False, True, 2, 7, 7, 2),
    ("sigmoid_shared_mask", "sigmoid", {}, False, False, True, False, 4, 3, 7, 3),
    ("softpick_bias_mask", "softpick", {}, False, True, True, False, 2, 6, 6, 2),
    ("causal_split", "softmax", {}, True, False, False, True, 2, 256, 256, 3),
]


@pytest.mark.parametrize("case", CHUNK_CASES, ids=[c[0] for c in CHUNK_CASES])
def test_batch_chunks_match_reference(case):
  """``batch_chunk``: chunks of sequences under lax.map, recomputed in the backward pass, equal the float64
  reference (forward and gradients w.r.t. q, k, v and a per-sequence bias), whatever the chunk size."""
  from attnlab.ops.dense import dense_attention
  _, score, params, with_sinks, with_bias, with_mask, with_segments, kv_heads, q_len, kv_len, chunk = case
  heads, batch = 4, 6
  q, k, v, bias, ct = make_inputs(11, q_len, kv_len, heads, kv_heads, batch=batch)
  rng = np.random.default_rng(5)
  kw = dict(score=score, causal=True, **params)
  if with_sinks:
    kw["sink_logits"] = SINKS[:heads].astype(np.float32)
  if with_mask:
    kw["mask"] = rng.random((1, heads, q_len, kv_len)) < 0.8
  if with_segments:
    ids = np.sort(rng.integers(0, 3, (batch, q_len)), axis=1).astype(np.int32)
    kw["segment_ids"] = (ids, ids)
  bias = bias if with_bias else None

  def loss(fn, q, k, v, bias, **extra):
    out = fn(q, k, v, bias=bias, **kw, **extra)
    return jnp.sum(out * ct), out

  argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
  (_, out), grads = jax.jit(jax.value_and_grad(functools.partial(loss, dense_attention, batch_chunk=chunk),
                                               argnums=argnums, has_aux=True))(q, k, v, bias)
  (_, ref), ref_grads = with_x64(lambda *a: jax.value_and_grad(functools.partial(loss, reference_attend),
                                                               argnums=argnums, has_aux=True)(
      *[None if x is None else jnp.asarray(x, jnp.float64) for x in a]), q, k, v, bias)
  assert relative_error(out, ref) < 2e-5, "forward"
  for i, (g, rg) in enumerate(zip(grads, ref_grads)):
    assert relative_error(g, rg) < 2e-4, f"gradient w.r.t. argument {i}"


def test_batch_chunks_keep_no_full_weights_for_the_backward_pass():
  """The point of the chunks: the compiled fwd+bwd needs far less scratch memory than the whole-batch dense path,
  which keeps (batch, heads, q_len, kv_len) weights for its backward pass."""
  from attnlab.ops.dense import dense_attention
  spec = jax.ShapeDtypeStruct((16, 256, 4, 16), jnp.float32)

  def temp_bytes(chunk):
    f = jax.grad(lambda q, k, v: jnp.sum(dense_attention(q, k, v, batch_chunk=chunk) ** 2), argnums=(0, 1, 2))
    return jax.jit(f).lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes

  whole, chunked = temp_bytes(None), temp_bytes(2)
  weights = 16 * 4 * 256 * 256 * 4
  assert whole > weights / 2, (whole, weights)  # the whole-batch path holds weights for the backward pass
  assert chunked < whole / 3, (chunked, whole)


def test_cpu_batch_chunk_policy():
  """Chunks are the largest divisor of the batch within max(MIN_CPU_CHUNK, budget / logit bytes per sequence);
  None when that is the whole batch or a single sequence."""
  from attnlab.ops.dense import CPU_CHUNK_LOGIT_BYTES, MIN_CPU_CHUNK, cpu_batch_chunk
  per_sequence = 4 * 4 * 128 * 128
  fits = CPU_CHUNK_LOGIT_BYTES // per_sequence
  assert fits > MIN_CPU_CHUNK
  assert cpu_batch_chunk(fits, 4, 128, 128) is None  # the whole batch fits
  assert cpu_batch_chunk(8 * fits, 4, 128, 128) == fits
  assert cpu_batch_chunk(16, 4, 2048, 2048) == MIN_CPU_CHUNK  # large sequences: the minimum chunk
  assert cpu_batch_chunk(15, 4, 2048, 2048) is None  # odd batch: only single sequences, not worth a loop
  assert cpu_batch_chunk(1, 64, 4096, 4096) is None
  assert cpu_batch_chunk(6, 4, 1, 4096) is None  # decode steps: tiny logits


def test_attend_on_cpu_runs_the_dense_path_in_batch_chunks():
  """impl='xla' on CPU passes cpu_batch_chunk to the dense path: a lax.map (a scan) over the chunks."""
  q = jnp.zeros((16, 256, 4, 16))
  assert jax.default_backend() == "cpu"
  jaxpr = str(jax.make_jaxpr(lambda q: attnlab.attend(q, q, q, impl="xla"))(q))
  assert "scan[" in jaxpr
  small = jnp.zeros((2, 16, 4, 16))
  assert "scan[" not in str(jax.make_jaxpr(lambda q: attnlab.attend(q, q, q, impl="xla"))(small))


@pytest.mark.parametrize("chunk", [0, 4, 2.0])
def test_bad_batch_chunk_is_one_clear_error(chunk):
  from attnlab.ops.dense import dense_attention
  q = jnp.zeros((6, 4, 2, 8))
  with pytest.raises(ValueError, match=r"batch_chunk must be a positive divisor of the batch \(6\); got"):
    dense_attention(q, q, q, batch_chunk=chunk)

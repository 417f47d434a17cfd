"""Sink metrics vs the authors' formulas (float64 references in ref_sinks.py), dense vs row-statistics paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnlab
from attnlab.analysis import metrics as M
from tests.ref_sinks import gu_importance, gu_proxy, norm_ratio

B, T, H, D = 2, 16, 4, 8


def _qkv(kv_heads=H, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (B, T, H, D)) * 2
  k = jax.random.normal(ks[1], (B, T, kv_heads, D)) * 2
  v = jax.random.normal(ks[2], (B, T, kv_heads, D))
  return q, k, v


@pytest.mark.parametrize("score,params", [("softmax", {}), ("sigmoid", {"b": 0.0}), ("relu", {})])
@pytest.mark.parametrize("k", [1, 3])
def test_importance_and_sink_rate_match_gu_code(score, params, k):
  q, kk, _ = _qkv()
  w = attnlab.attention_weights(q, kk, score=score, **params)
  cols = M.columns_from_weights(w, k)
  np.testing.assert_allclose(M.importance(cols.column, k), gu_importance(w)[..., k - 1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(M.importance(cols.proxy_column, k), gu_importance(gu_proxy(w))[..., k - 1],
                             rtol=1e-5, atol=1e-6)
  out = M.layer_metrics(cols, k=k, eps=0.3)
  ref_rate = 100 * (gu_importance(gu_proxy(w))[..., k - 1] > 0.3).mean(0)
  np.testing.assert_allclose(out["sink_rate_proxy"], ref_rate)
  np.testing.assert_allclose(out["row_mass"], np.asarray(w)[..., k:, :].sum(-1).mean((0, 2)), rtol=1e-5)


def test_switched_off_head_is_a_proxy_sink_but_not_a_raw_sink():
  w = np.tril(np.full((T, T), 1e-3))
  w[:, 0] = 3e-3  # a head that switched itself off: tiny mass, what is left sits on token 1
  w = jnp.asarray(np.broadcast_to(w, (B, 1, T, T)))
  out = M.layer_metrics(M.columns_from_weights(w), eps=0.1)
  assert out["sink_rate_proxy"][0] == 100.0
  assert out["sink_rate_raw"][0] == 0.0
  assert out["row_mass"][0] < 0.05 and out["first_token_attn_raw"][0] < 0.01


def test_query_mask_selects_queries_after_k():
  w = jnp.asarray(np.broadcast_to(np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None], (B, 1, T, T)))
  mask = jnp.zeros((B, T), bool).at[:, 4].set(True)
  out = M.layer_metrics(M.columns_from_weights(w), query_mask=mask)
  np.testing.assert_allclose(out["first_token_attn_raw"], [1 / 5], rtol=1e-6)
  all_q = M.layer_metrics(M.columns_from_weights(w))
  np.testing.assert_allclose(all_q["first_token_attn_raw"], [np.mean(1 / np.arange(2, T + 1))], rtol=1e-6)


@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_lse_path_equals_dense_path(chunk):
  q, k, _ = _qkv(kv_heads=2)
  sinks = jnp.array([0.0, 1.0, -1.0, 2.0])
  lse = M.chunked_logsumexp(q, k, chunk=chunk)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, 2, axis=2)) / np.sqrt(D)
  s = jnp.where(np.tril(np.ones((T, T), bool)), s, -jnp.inf)
  np.testing.assert_allclose(lse, jax.nn.logsumexp(s, -1), rtol=1e-5)
  for key in (1, 4):
    dense = M.columns_from_weights(attnlab.attention_weights(q, k, sink_logits=sinks), key)
    rows = M.softmax_columns_from_lse(q, k, lse, key, sink_logits=sinks)
    for field in ("column", "row_mass", "sink_mass"):
      np.testing.assert_allclose(getattr(rows, field), getattr(dense, field) if field != "sink_mass" else
                                 1 - dense.row_mass, rtol=2e-5, atol=2e-6, err_msg=field)


def test_norms_and_cosine():
  q, k, v = _qkv(kv_heads=2)
  np.testing.assert_allclose(M.norm_ratio(v, 3), norm_ratio(v, 2), rtol=1e-5)
  cos = M.cosine_to_key(q, k, 2)
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)[:, 1]
  ref = np.einsum("bqhd,bhd->bhq", qn, np.repeat(kn, 2, axis=1))
  ref /= np.linalg.norm(qn, axis=-1).transpose(0, 2, 1) * np.linalg.norm(np.repeat(kn, 2, axis=1), axis=-1)[..., None]
  np.testing.assert_allclose(cos, ref, rtol=1e-4, atol=1e-6)
  h = jnp.zeros((1, 4, 3)).at[0, 2, 1].set(-7.0).at[0, 0, 0].set(2.0)
  act = M.activation_metrics(h, top=2)
  np.testing.assert_allclose(act["top_abs"], [7.0, 2.0])
  assert act["top_position"].tolist() == [2, 0] and act["top_channel"].tolist() == [1, 0]


def test_bad_k_is_rejected():
  w = jnp.ones((1, 1, 4, 4))
  with pytest.raises(ValueError, match="1-based"):
    M.columns_from_weights(w, 0)
  with pytest.raises(ValueError, match="1-based"):
    M.columns_from_weights(w, 5)


@pytest.mark.parametrize("att", [dict(sink_token=True), dict(sink_logit=True, sink_logit_init=1.0),
                                 dict(score="sigmoid", score_params={"b": 0.0})])
def test_model_metrics_from_internals(att):
  cfg = attnlab.ModelConfig(vocab_size=17, d_model=32, num_layers=2, max_seq_len=T,
                            attention=attnlab.AttentionConfig(num_heads=2, **att))
  model = attnlab.DecoderLM(cfg, rngs=nnx.Rngs(0))
  _, aux = model(jax.random.randint(jax.random.key(0), (B, T), 0, 17), return_internals=True)
  m = M.model_metrics(aux)
  assert len(m["layers"]) == 2 and len(m["hidden"]) == 3
  layer = m["layers"][0]
  assert set(layer) >= {"sink_rate_raw", "sink_rate_proxy", "value_norm_ratio", "key_norm_ratio", "cos_q_key"}
  assert all(v.shape == (2,) for v in layer.values())
  if att.get("score") == "sigmoid":
    assert layer["row_mass"].min() > 1.0 and layer["sink_mass"].max() == 0.0  # ~ t/2 at init with b = 0
  else:
    assert layer["sink_mass"].min() > 0.0
    np.testing.assert_allclose(layer["row_mass"] + layer["sink_mass"], 1.0, rtol=1e-5)
  assert set(m["summary"]) >= {"sink_rate_proxy", "sink_rate_raw", "massive_ratio"}


def test_layers_without_dense_weights_are_left_out():
  w = attnlab.attention_weights(*_qkv()[:2])
  internals = {"layers": [{}, {"weights": w, "sink_mass": jnp.zeros(w.shape[:-1])}],
               "hidden": [jnp.ones((B, T, D))] * 3}
  m = M.model_metrics(internals)
  assert m["layers"][0] == {} and "sink_rate_raw" in m["layers"][1]
  np.testing.assert_allclose(m["summary"]["sink_rate_raw"], m["layers"][1]["sink_rate_raw"].mean())

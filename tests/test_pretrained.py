"""attnlab.pretrained without torch: config mapping, refusals, the safetensors reader's checks, tokenizer specials,
and the new architecture options used from scratch."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from attnlab.attention.config import AttentionConfig
from attnlab.layers import apply_rope, rope_inv_freq
from attnlab.model.config import ModelConfig
from attnlab.model.lm import DecoderLM
from attnlab.pretrained import hf_model_config, hf_tokenizer, load_hf, read_safetensors, write_safetensors
from attnlab.streaming import StreamingPolicy, stream_logits

LLAMA = {"model_type": "llama", "vocab_size": 23, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8, "rms_norm_eps": 1e-5,
         "hidden_act": "silu", "tie_word_embeddings": False}


def _llama_tensors(c=LLAMA, dtype=np.float32):
  rng = np.random.RandomState(0)
  d, f, v, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["hidden_size"] // c["num_attention_heads"]
  kv = c["num_key_value_heads"] * hd
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f)})
  return {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}


def _write(directory, config=LLAMA, tensors=None):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  write_safetensors(os.path.join(directory, "model.safetensors"), _llama_tensors() if tensors is None else tensors)
  return str(directory)


def test_load_llama_fills_every_parameter(tmp_path):
  tensors = _llama_tensors()
  cfg, model = load_hf(_write(tmp_path, tensors=tensors))
  assert cfg.attention.kv_heads == 2 and cfg.vocab_size == 23 and cfg.max_seq_len == 8
  np.testing.assert_array_equal(np.asarray(model.embed.embedding[...]), tensors["model.embed_tokens.weight"])
  np.testing.assert_array_equal(np.asarray(model.blocks[0].attn.qkv.k.kernel[...]),
                                tensors["model.layers.0.self_attn.k_proj.weight"].T)
  np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), tensors["lm_head.weight"].T)
  assert np.isfinite(np.asarray(model(jnp.zeros((1, 8), jnp.int32)))).all()


def test_bf16_checkpoint_and_known_buffers(tmp_path):
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in _llama_tensors().items()}
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)  # a buffer: ignored
  cfg, model = load_hf(_write(tmp_path, tensors=tensors), dtype="bfloat16")
  assert cfg.dtype == "bfloat16" and model.embed.embedding[...].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(model.final_norm.scale[...]),
                                tensors["model.norm.weight"].astype(np.float32))


def test_rope_config_forms():
  legacy = hf_model_config(dict(LLAMA, rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}))
  v5 = hf_model_config(dict(LLAMA, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}))
  assert legacy == v5 and dict(v5.attention.rope_scaling) == {"type": "linear", "factor": 2.0}
  assert v5.attention.rope_base == 5e5
  neox = hf_model_config({"model_type": "gpt_neox", "vocab_size": 50, "hidden_size": 64, "num_attention_heads": 4,
                          "num_hidden_layers": 1, "intermediate_size": 128, "rotary_pct": 0.25,
                          "rotary_emb_base": 1000})
  assert neox.attention.rope_fraction == 0.25 and neox.attention.rope_base == 1000 and neox.parallel_residual


@pytest.mark.parametrize("change, field", [
    ({"model_type": "bert"}, "model_type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral", "sliding_window": 0}, "sliding_window"),
])
def test_unsupported_options_are_refused(change, field):
  with pytest.raises(ValueError, match=field):
    hf_model_config(dict(LLAMA, **change))


@pytest.mark.parametrize("change, field", [({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse"),
                                           ({"activation_function": "swish"}, "activation_function"),
                                           ({"add_cross_attention": True}, "cross")])
def test_gpt2_options_are_refused(change, field):
  with pytest.raises(ValueError, match=field):
    hf_model_config(dict({"model_type": "gpt2", "vocab_size": 50, "n_embd": 16, "n_head": 2, "n_layer": 1}, **change))


def test_compute_dtype_is_checked():
  with pytest.raises(ValueError, match="dtype"):
    hf_model_config(LLAMA, dtype="float8")


def test_sliding_windows_map_to_attention_windows():
  assert hf_model_config(dict(LLAMA, model_type="mistral", sliding_window=4)).attention.window == 4
  c = dict(LLAMA, model_type="qwen2", use_sliding_window=False, sliding_window=4)
  assert hf_model_config(c).attention.qkv_bias is True
  assert hf_model_config(c).attention.window is None
  mixed = hf_model_config(dict(c, use_sliding_window=True, max_window_layers=1, num_hidden_layers=3))
  assert [mixed.layer_attention(i).window for i in range(3)] == [None, 4, 4]


def test_missing_files(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    load_hf(str(tmp_path / "nope"))
  with pytest.raises(ValueError, match="config.json"):
    load_hf(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(LLAMA))
  with pytest.raises(ValueError, match="no weights"):
    load_hf(str(tmp_path))


def test_truncated_and_malformed_safetensors(tmp_path):
  src = _write(tmp_path)
  path = os.path.join(src, "model.safetensors")
  data = open(path, "rb").read()
  open(path, "wb").write(data[:-10])
  with pytest.raises(ValueError, match="truncated"):
    load_hf(src)
  open(path, "wb").write(data[:20])
  with pytest.raises(ValueError, match="truncated"):
    read_safetensors(path)
  open(path, "wb").write(b"\x01")
  with pytest.raises(ValueError, match="not a safetensors file"):
    read_safetensors(path)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.0.mlp.up_proj.weight"), "missing"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 16), np.float32)}), "shape"),
    (lambda t: t.update({"model.norm.weight": np.zeros(16, np.int32)}), "dtype"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(16, np.float32)}), "fill no"),
    (lambda t: t.pop("lm_head.weight"), "lm_head.weight"),
])
def test_mismatched_checkpoint(tmp_path, edit, message):
  tensors = _llama_tensors()
  edit(tensors)
  with pytest.raises(ValueError, match=message):
    load_hf(_write(tmp_path, tensors=tensors))


def test_tied_head_must_equal_the_embedding(tmp_path):
  with pytest.raises(ValueError, match="differs from the token embedding"):
    load_hf(_write(tmp_path, dict(LLAMA, tie_word_embeddings=True)))
  tensors = _llama_tensors()
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  cfg, model = load_hf(_write(tmp_path, dict(LLAMA, tie_word_embeddings=True), tensors))
  assert cfg.tie_embeddings and model.head is None


def test_shard_index_errors(tmp_path):
  src = _write(tmp_path)
  index = {"weight_map": {k: "model-00001-of-00002.safetensors" for k in _llama_tensors()}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(ValueError, match="missing"):
    load_hf(src)
  os.rename(tmp_path / "model.safetensors", tmp_path / "model-00001-of-00002.safetensors")
  load_hf(src)
  index["weight_map"]["model.extra"] = "model-00001-of-00002.safetensors"
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(ValueError, match="does not contain"):
    load_hf(src)


def _tokenizer(directory, vocab, **files):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[0]))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(os.path.join(directory, "tokenizer.json"))
  for name, content in files.items():
    with open(os.path.join(directory, name + ".json"), "w") as f:
      json.dump(content, f)


def test_tokenizer_specials_from_the_checkpoint_files(tmp_path):
  src = _write(tmp_path)
  _tokenizer(src, ["<|endoftext|>", "a", "b", "<pad>"],
             tokenizer_config={"eos_token": "<|endoftext|>", "bos_token": None},
             special_tokens_map={"pad_token": {"content": "<pad>"}})
  tok = hf_tokenizer(src)
  assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.vocab_size, tok.add_bos) == (0, 0, 3, 4, False)
  assert list(tok.encode("a b")) == [1, 2]
  load_hf(src)  # 4 ids fit the checkpoint's 23
  _tokenizer(src, [f"w{i}" for i in range(30)], tokenizer_config={"eos_token": "w0"})
  with pytest.raises(ValueError, match="pad_token '<pad>' is not in tokenizer.json"):
    load_hf(src)
  os.remove(os.path.join(src, "special_tokens_map.json"))
  with pytest.raises(ValueError, match="more than the checkpoint's vocab_size"):
    load_hf(src)


def test_new_options_train_from_scratch():
  att = AttentionConfig(num_heads=4, num_kv_heads=2, qkv_bias=True, rope_fraction=0.5, qk_norm=True,
                        qk_norm_eps=1e-5, rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 16})
  cfg = ModelConfig(vocab_size=17, d_model=32, num_layers=1, attention=att, mlp_activation="gelu_exact",
                    mlp_bias=True, parallel_residual=True, norm="layernorm", norm_fast_variance=False, max_seq_len=16)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  assert model.blocks[0].attn.qkv.q.bias is not None and model.blocks[0].attn.o.bias is None
  assert model.blocks[0].mlp.up.bias is not None
  tokens = jnp.arange(32).reshape(2, 16) % 17
  loss = lambda m: -jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])
  grads = nnx.jit(nnx.grad(loss))(model)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match="rope_scaling"):
    AttentionConfig(rope_scaling={"type": "yarn", "factor": 2.0})
  with pytest.raises(ValueError, match="rope_fraction"):
    AttentionConfig(rope_fraction=0.0)


def test_rope_defaults_unchanged_and_partial_rotary():
  x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
  pos = jnp.arange(5)[None]
  np.testing.assert_array_equal(apply_rope(x, pos, 100.0, scaling=()), apply_rope(x, pos, 100.0))
  part = apply_rope(x, pos, 100.0, fraction=0.5)
  np.testing.assert_array_equal(part[..., 4:], x[..., 4:])
  np.testing.assert_allclose(part[..., :4], apply_rope(x[..., :4], pos, 100.0), rtol=1e-6)
  lin = rope_inv_freq(8, 100.0, {"type": "linear", "factor": 4.0})
  np.testing.assert_allclose(lin, rope_inv_freq(8, 100.0) / 4, rtol=1e-6)


def test_streaming_honours_the_new_options():
  """The KV-cache path runs partial/scaled RoPE and the parallel residual like the full forward."""
  att = AttentionConfig(num_heads=2, qkv_bias=True, rope_fraction=0.5, rope_scaling={"type": "linear", "factor": 2.0})
  cfg = ModelConfig(vocab_size=17, d_model=16, num_layers=1, attention=att, parallel_residual=True, mlp_bias=True,
                    max_seq_len=8)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.arange(16).reshape(2, 8) % 17
  np.testing.assert_allclose(stream_logits(model, tokens, StreamingPolicy(0, 8)), model(tokens), atol=2e-5, rtol=2e-5)

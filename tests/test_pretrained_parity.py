"""Parity of imported Hugging Face checkpoints: for each family a tiny random ``transformers`` model, saved with
``save_pretrained`` and loaded with :func:`attnlab.pretrained.load_hf`, gives the same logits, per-layer hidden
states and attention weights as the ``transformers`` model (float32, eager attention).

Needs torch and transformers (``pip install -e '.[hf-test]'``); skipped without them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attnlab.pretrained import (hf_state_to_params, load_checkpoint, load_hf, params_into_model,  # noqa: E402
                                read_safetensors, write_safetensors)

V, T = 101, 16
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}  # head_dim 8: one frequency falls in the interpolated band
SMALL = dict(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=2)

CASES = {
    # GQA 6/2, Llama-3 RoPE scaling, untied head
    "llama_gqa_llama3": ("LlamaConfig", "LlamaForCausalLM",
                         dict(SMALL, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=T,
                              rms_norm_eps=1e-5, rope_theta=5e5, rope_scaling=LLAMA3)),
    # MHA with every bias, linear RoPE scaling, tied head
    "llama_tied_linear_bias": ("LlamaConfig", "LlamaForCausalLM",
                               dict(SMALL, num_attention_heads=4, max_position_embeddings=T,
                                    rope_scaling={"rope_type": "linear", "factor": 4.0}, attention_bias=True,
                                    mlp_bias=True, tie_word_embeddings=True)),
    # a sliding window shorter than the sequence
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(SMALL, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=T,
                     sliding_window=5)),
    # q/k/v biases without an o bias, tied, 3 layers, odd kv heads
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(SMALL, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3,
                   max_position_embeddings=T, tie_word_embeddings=True)),
    # QK-norm; heads x head_dim (64) differs from hidden_size (32)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=T, tie_word_embeddings=False)),
    # learned positions, Conv1D layout, biases, LayerNorm, gelu_new, tied head, 5 heads
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=V, n_embd=30, n_head=5, n_layer=2, n_positions=T)),
    # parallel residual, partial rotary, fused per-head qkv, 3 heads
    "neox_parallel": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                      dict(SMALL, intermediate_size=96, num_attention_heads=3, rotary_pct=0.25,
                           max_position_embeddings=T, use_parallel_residual=True)),
    "neox_sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                        dict(SMALL, intermediate_size=96, num_attention_heads=4, rotary_pct=0.5,
                             max_position_embeddings=T, use_parallel_residual=False, hidden_act="gelu_new")),
}


def _hf_model(name: str, seed: int = 0):
  config_cls, model_cls, kw = CASES[name]
  torch.manual_seed(seed)
  config = getattr(transformers, config_cls)(**kw, attn_implementation="eager")
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():  # HF starts norms at 1 and biases at 0, which would hide mapping bugs
    for pname, p in model.named_parameters():
      if "norm" in pname or "ln_" in pname or pname.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
      if "embed" in pname or "wte" in pname or "wpe" in pname:
        p.mul_(20.0)
  return model


def _compare(model, src, ids):
  with torch.no_grad():
    out = model(torch.tensor(ids), output_hidden_states=True, output_attentions=True)
  cfg, lm = load_hf(str(src))
  with jax.default_matmul_precision("highest"):
    logits, aux = lm(jnp.asarray(ids), return_internals=True)
    final = lm.final_norm(aux["hidden"][-1])
  ref = out.logits.numpy()
  scale = np.abs(ref).max()
  assert np.abs(np.asarray(logits) - ref).max() <= 1e-4 * scale
  assert np.array_equal(np.asarray(logits).argmax(-1), ref.argmax(-1))
  ours = [np.asarray(h) for h in aux["hidden"][:-1]] + [np.asarray(final)]
  assert len(ours) == len(out.hidden_states) == cfg.num_layers + 1
  for i, (a, b) in enumerate(zip(ours, out.hidden_states)):
    b = b.numpy()
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), f"hidden state {i}"
  assert len(out.attentions) == cfg.num_layers
  for i, (layer, b) in enumerate(zip(aux["layers"], out.attentions)):
    np.testing.assert_allclose(np.asarray(layer["weights"]), b.numpy(), atol=1e-5, err_msg=f"attention layer {i}")
  return cfg


@pytest.mark.parametrize("name", list(CASES))
def test_parity(name, tmp_path):
  model = _hf_model(name)
  model.save_pretrained(tmp_path)
  ids = np.random.RandomState(1).randint(0, V, (2, T))
  cfg = _compare(model, tmp_path, ids)
  assert cfg.vocab_size == V


def test_parity_sharded_checkpoint(tmp_path):
  model = _hf_model("qwen3", seed=3)
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert len(list(tmp_path.glob("*.safetensors"))) > 1
  _compare(model, tmp_path, np.random.RandomState(2).randint(0, V, (1, T)))


def test_parity_gpt2_hub_layout(tmp_path):
  """The hub's gpt2 file: no ``transformer.`` prefix and the causal-mask buffers ``h.N.attn.bias`` stored."""
  model = _hf_model("gpt2", seed=4)
  model.save_pretrained(tmp_path)
  path = tmp_path / "model.safetensors"
  tensors = {k.removeprefix("transformer."): np.array(v) for k, v in read_safetensors(str(path)).items()}
  for i in range(2):
    tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, T, T), np.float32))
  write_safetensors(str(path), tensors)
  _compare(model, tmp_path, np.random.RandomState(3).randint(0, V, (1, T)))


def test_wrong_variants_differ(tmp_path):
  """The parity checks are sensitive to the options: plain RoPE instead of llama3 scaling changes the logits."""
  model = _hf_model("llama_gqa_llama3")
  model.save_pretrained(tmp_path)
  cfg, lm = load_hf(str(tmp_path))
  ids = jnp.asarray(np.random.RandomState(1).randint(0, V, (1, T)))
  plain = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, rope_scaling=()))
  other = params_into_model(plain, hf_state_to_params(plain, "llama", load_checkpoint(str(tmp_path))))
  assert np.abs(np.asarray(lm(ids)) - np.asarray(other(ids))).max() > 1e-4


def test_sliding_window_maps_to_the_attention_window(tmp_path):
  config_cls, model_cls, kw = CASES["mistral"]
  getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw)).save_pretrained(tmp_path)
  cfg, _ = load_hf(str(tmp_path))
  assert cfg.attention.window == 5 < T
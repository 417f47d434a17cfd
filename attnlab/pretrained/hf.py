"""Hugging Face decoder checkpoints as attnlab models: ``config.json`` -> :class:`ModelConfig`, safetensors
weights -> :class:`DecoderLM` parameters, exactly (same logits, hidden states and attention weights).

Families: Llama (incl. Llama-3 ``rope_scaling``), Mistral, Qwen2/2.5, Qwen3, GPT-2, GPT-NeoX/Pythia. Every attnlab
parameter is filled from a checkpoint tensor of the right shape; a checkpoint tensor that fills nothing (other
than known non-parameter buffers) is an error, as is any option attnlab does not reproduce.

    cfg = hf_model_config(json.load(open("config.json")))      # ModelConfig
    params = hf_state_to_params(cfg, model_type, tensors)        # {"blocks.0.attn.qkv.q.kernel": array, ...}
    cfg, model = load_hf("path/to/checkpoint")                   # both, into a DecoderLM
"""

from __future__ import annotations

import dataclasses

import json
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab.attention.config import AttentionConfig
from attnlab.data.tokenizer import HFTokenizer
from attnlab.model.config import ModelConfig
from attnlab.model.lm import DecoderLM
from attnlab.pretrained.safetensors_io import FLOAT_DTYPES, load_checkpoint
from attnlab.pretrained.torch_bin import has_torch_weights, load_torch_checkpoint

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
MODEL_TYPES = LLAMA_LIKE + ("gpt2", "gpt_neox")
COMPUTE_DTYPES = ("float32", "bfloat16")
# HF tensors that are buffers, not parameters (causal masks, cached RoPE frequencies)
BUFFERS = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|attention\.bias|attention\.masked_bias|"
                     r"rotary_emb\.inv_freq)$")
# activation name in config.json -> attnlab MLP activation (non-gated)
ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact",
               "relu": "relu"}


def _err(field: str, value, why: str) -> ValueError:
  return ValueError(f"config.json {field}={value!r}: {why}")


def _get(c: dict, *names, default=None):
  for n in names:
    if c.get(n) is not None:
      return c[n]
  return default


def _rope(c: dict, model_type: str) -> tuple[float, float, tuple]:
  """(rope_base, rope_fraction, rope_scaling) from the v5 ``rope_parameters`` or the older ``rope_theta`` /
  ``rope_scaling`` / ``rotary_pct`` / ``rotary_emb_base`` fields."""
  params = dict(c.get("rope_parameters") or {})
  legacy = dict(c.get("rope_scaling") or {})
  field = "rope_parameters" if params else "rope_scaling"
  kinds = [d.get("rope_type", d.get("type")) for d in (params, legacy)]
  if None not in kinds and kinds[0] != kinds[1]:
    raise _err("rope_scaling", legacy, f"disagrees with rope_parameters (rope_type {kinds[0]!r})")
  params = {**legacy, **params}
  base = _get(params, "rope_theta", default=_get(c, "rope_theta", "rotary_emb_base", default=10_000.0))
  fraction = _get(params, "partial_rotary_factor",
                  default=_get(c, "partial_rotary_factor", "rotary_pct", default=0.25 if model_type == "gpt_neox"
                               else 1.0))
  kind = _get(params, "rope_type", "type", default="default")
  keys = {"linear": ("factor",),
          "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
  if kind == "default":
    return float(base), float(fraction), ()
  if kind not in keys or model_type == "gpt_neox":
    raise _err(f"{field}.rope_type", kind, "this RoPE scaling is not implemented in attnlab (supported: default, "
               f"linear{', llama3' if model_type != 'gpt_neox' else ''})")
  scaling = {"type": kind}
  for k in keys[kind]:
    v = params.get(k)
    if v is None and k == "original_max_position_embeddings":
      v = c.get("max_position_embeddings")
    if v is None:
      raise _err(f"{field}.{k}", None, f"needed by rope_type {kind!r}")
    scaling[k] = float(v)
  extra = set(params) - set(keys[kind]) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
  if extra:
    raise _err(field, sorted(extra), f"options of rope_type {kind!r} that attnlab does not implement")
  return float(base), float(fraction), tuple(sorted(scaling.items()))


def _windows(c: dict, model_type: str, num_layers: int) -> list[int | None]:
  """The sliding window of each layer (None: full attention), as transformers applies them."""
  window = c.get("sliding_window")
  if model_type == "mistral":
    return [window] * num_layers
  if model_type not in ("qwen2", "qwen3") or window is None or not c.get("use_sliding_window", False):
    return [None] * num_layers
  types = c.get("layer_types")
  if types is not None:
    return [window if t == "sliding_attention" else None for t in types]
  return [window if i >= c.get("max_window_layers", num_layers) else None for i in range(num_layers)]


def hf_model_config(config: dict[str, Any], *, dtype: str = "float32", max_seq_len: int | None = None) -> ModelConfig:
  """The :class:`ModelConfig` of a Hugging Face ``config.json`` (as a dict). ``max_seq_len`` overrides the
  checkpoint's context length (``max_position_embeddings`` / ``n_positions``). Unknown ``model_type`` or an option
  attnlab does not reproduce -> ValueError naming the field."""
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}; got {dtype!r}")
  c = dict(config)
  model_type = c.get("model_type")
  if model_type not in MODEL_TYPES:
    raise _err("model_type", model_type, f"not supported (supported: {', '.join(MODEL_TYPES)})")
  if c.get("is_encoder_decoder") or c.get("add_cross_attention"):
    raise _err("add_cross_attention", True, "cross-attention is not supported")
  if model_type == "gpt2":
    return _gpt2_config(c, dtype=dtype, max_seq_len=max_seq_len)
  d, heads = int(_get(c, "hidden_size")), int(_get(c, "num_attention_heads"))
  layers = int(c["num_hidden_layers"])
  rope_base, rope_fraction, rope_scaling = _rope(c, model_type)
  ctx = int(c.get("max_position_embeddings", 2048)) if max_seq_len is None else int(max_seq_len)
  windows = _windows(c, model_type, layers)
  for w in windows:
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0):
      raise _err("sliding_window", w, "must be a positive int")
  act = c.get("hidden_act", "gelu" if model_type == "gpt_neox" else "silu")
  if model_type == "gpt_neox":
    if act not in ACTIVATIONS:
      raise _err("hidden_act", act, f"not supported (supported: {sorted(ACTIVATIONS)})")
    bias = bool(c.get("attention_bias", True))
    att = AttentionConfig(num_heads=heads, rope_base=rope_base, rope_fraction=rope_fraction, use_bias=bias)
    return ModelConfig(vocab_size=int(c["vocab_size"]), d_model=d, num_layers=layers, attention=att,
                       mlp_dim=int(c["intermediate_size"]), mlp_activation=ACTIVATIONS[act], mlp_bias=True,
                       norm="layernorm", norm_eps=float(c.get("layer_norm_eps", 1e-5)), norm_fast_variance=False,
                       tie_embeddings=bool(c.get("tie_word_embeddings", False)), max_seq_len=ctx,
                       parallel_residual=bool(c.get("use_parallel_residual", True)), dtype=dtype)
  if act != "silu":
    raise _err("hidden_act", act, "the gated MLP of this family is supported with silu only")
  if rope_fraction != 1.0:
    raise _err("partial_rotary_factor", rope_fraction, f"partial rotary is not part of {model_type}")
  head_dim = _get(c, "head_dim", default=128 if model_type == "qwen3" else None)
  if head_dim is None:
    if d % heads:
      raise _err("num_attention_heads", heads, f"does not divide hidden_size {d}; set head_dim")
    head_dim = d // heads
  kv = _get(c, "num_key_value_heads", default=heads)
  eps = float(c.get("rms_norm_eps", 1e-6))
  if model_type == "qwen2":  # q/k/v biases are hard-coded, W_o has none
    bias = dict(use_bias=False, qkv_bias=True)
  elif model_type == "mistral":
    bias = dict(use_bias=False)
  else:
    bias = dict(use_bias=bool(c.get("attention_bias", False)))
  att = AttentionConfig(num_heads=heads, num_kv_heads=None if kv == heads else int(kv), head_dim=int(head_dim),
                        rope_base=rope_base, rope_scaling=rope_scaling, qk_norm=model_type == "qwen3",
                        qk_norm_eps=eps, **bias)
  per_layer = tuple(dataclasses.replace(att, window=w) for w in windows)
  att = per_layer[0] if len(set(windows)) == 1 else per_layer
  return ModelConfig(vocab_size=int(c["vocab_size"]), d_model=d, num_layers=layers, attention=att,
                     mlp_dim=int(c["intermediate_size"]), mlp_activation="swiglu",
                     mlp_bias=bool(c.get("mlp_bias", False)) and model_type == "llama", norm="rmsnorm", norm_eps=eps,
                     tie_embeddings=bool(c.get("tie_word_embeddings", False)), max_seq_len=ctx, dtype=dtype)


def _gpt2_config(c: dict, *, dtype: str, max_seq_len: int | None) -> ModelConfig:
  for field, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True)):
    if bool(c.get(field, ok)) != ok:
      raise _err(field, c[field], "changes the attention scale; not supported")
  act = c.get("activation_function", "gelu_new")
  if act not in ACTIVATIONS:
    raise _err("activation_function", act, f"not supported (supported: {sorted(ACTIVATIONS)})")
  n_pos = int(c.get("n_positions", 1024))
  if max_seq_len is not None and int(max_seq_len) != n_pos:
    raise _err("n_positions", n_pos, f"GPT-2's learned position table has {n_pos} rows; max_seq_len {max_seq_len} "
               "cannot differ")
  d, heads = int(c.get("n_embd", 768)), int(c.get("n_head", 12))
  att = AttentionConfig(num_heads=heads, rope=False, use_bias=True)
  return ModelConfig(vocab_size=int(c["vocab_size"]), d_model=d, num_layers=int(c.get("n_layer", 12)), attention=att,
                     mlp_dim=int(c.get("n_inner") or 4 * d), mlp_activation=ACTIVATIONS[act], mlp_bias=True,
                     norm="layernorm", norm_eps=float(c.get("layer_norm_epsilon", 1e-5)), norm_fast_variance=False,
                     tie_embeddings=bool(c.get("tie_word_embeddings", True)), max_seq_len=n_pos,
                     position_embedding="learned", dtype=dtype)


class _Tensors:
  """The checkpoint's tensors, handed out by name with their shape checked; remembers which were used."""

  def __init__(self, tensors: dict[str, np.ndarray], prefix: str):
    self.tensors, self.prefix, self.used = tensors, prefix, set()

  def has(self, name: str, *, prefixed: bool = True) -> bool:
    return (self.prefix + name if prefixed else name) in self.tensors

  def __call__(self, name: str, shape: tuple[int, ...], *, prefixed: bool = True) -> np.ndarray:
    key = self.prefix + name if prefixed else name
    if key not in self.tensors:
      raise ValueError(f"checkpoint tensor {key!r} is missing")
    arr = self.tensors[key]
    if tuple(arr.shape) != tuple(shape):
      raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(arr.shape)}; the config implies {tuple(shape)}")
    if arr.dtype.name not in ("float64", "float32", "float16", "bfloat16"):
      raise ValueError(f"checkpoint tensor {key!r} has dtype {arr.dtype.name}; expected one of {FLOAT_DTYPES}")
    self.used.add(key)
    return np.asarray(arr, np.float32)


def _prefix(tensors: dict, prefix: str) -> str:
  return prefix if any(k.startswith(prefix) for k in tensors) else ""


def _llama_params(cfg: ModelConfig, t: _Tensors) -> dict[str, np.ndarray]:
  att = cfg.attention_pattern[0]
  d, h, hd, kv, f = cfg.d_model, att.num_heads, att.resolved_head_dim(cfg.d_model), att.kv_heads, cfg.resolved_mlp_dim
  qkv_bias = att.use_bias if att.qkv_bias is None else att.qkv_bias
  p = {"embed.embedding": t("embed_tokens.weight", (cfg.vocab_size, d)), "final_norm.scale": t("norm.weight", (d,))}
  for i in range(cfg.num_layers):
    src, dst = f"layers.{i}.", f"blocks.{i}."
    p[dst + "attn_norm.scale"] = t(src + "input_layernorm.weight", (d,))
    p[dst + "mlp_norm.scale"] = t(src + "post_attention_layernorm.weight", (d,))
    for name, out in (("q", h * hd), ("k", kv * hd), ("v", kv * hd)):
      p[dst + f"attn.qkv.{name}.kernel"] = t(src + f"self_attn.{name}_proj.weight", (out, d)).T
      if qkv_bias:
        p[dst + f"attn.qkv.{name}.bias"] = t(src + f"self_attn.{name}_proj.bias", (out,))
    p[dst + "attn.o.kernel"] = t(src + "self_attn.o_proj.weight", (d, h * hd)).T
    if att.use_bias:
      p[dst + "attn.o.bias"] = t(src + "self_attn.o_proj.bias", (d,))
    if att.qk_norm:
      p[dst + "attn.qkv.q_norm.scale"] = t(src + "self_attn.q_norm.weight", (hd,))
      p[dst + "attn.qkv.k_norm.scale"] = t(src + "self_attn.k_norm.weight", (hd,))
    for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
      p[dst + f"mlp.{name}.kernel"] = t(src + f"mlp.{name}_proj.weight", shape).T
      if cfg.mlp_bias:
        p[dst + f"mlp.{name}.bias"] = t(src + f"mlp.{name}_proj.bias", shape[:1])
  return p


def _gpt2_params(cfg: ModelConfig, t: _Tensors) -> dict[str, np.ndarray]:
  d, f = cfg.d_model, cfg.resolved_mlp_dim
  p = {"embed.embedding": t("wte.weight", (cfg.vocab_size, d)), "pos_embed.embedding": t("wpe.weight", (cfg.max_seq_len, d)),
       "final_norm.scale": t("ln_f.weight", (d,)), "final_norm.bias": t("ln_f.bias", (d,))}
  for i in range(cfg.num_layers):
    src, dst = f"h.{i}.", f"blocks.{i}."
    for a, b in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
      p[dst + b + ".scale"], p[dst + b + ".bias"] = t(src + a + ".weight", (d,)), t(src + a + ".bias", (d,))
    w, bias = t(src + "attn.c_attn.weight", (d, 3 * d)), t(src + "attn.c_attn.bias", (3 * d,))  # Conv1D: (in, out)
    for j, name in enumerate("qkv"):  # columns [q | k | v]
      p[dst + f"attn.qkv.{name}.kernel"], p[dst + f"attn.qkv.{name}.bias"] = w[:, j * d:(j + 1) * d], bias[j * d:(j + 1) * d]
    p[dst + "attn.o.kernel"], p[dst + "attn.o.bias"] = t(src + "attn.c_proj.weight", (d, d)), t(src + "attn.c_proj.bias", (d,))
    p[dst + "mlp.up.kernel"], p[dst + "mlp.up.bias"] = t(src + "mlp.c_fc.weight", (d, f)), t(src + "mlp.c_fc.bias", (f,))
    p[dst + "mlp.down.kernel"], p[dst + "mlp.down.bias"] = t(src + "mlp.c_proj.weight", (f, d)), t(src + "mlp.c_proj.bias", (d,))
  return p


def _neox_params(cfg: ModelConfig, t: _Tensors) -> dict[str, np.ndarray]:
  att = cfg.attention_pattern[0]
  d, h, f = cfg.d_model, att.num_heads, cfg.resolved_mlp_dim
  hd = att.resolved_head_dim(d)
  p = {"embed.embedding": t("embed_in.weight", (cfg.vocab_size, d)),
       "final_norm.scale": t("final_layer_norm.weight", (d,)), "final_norm.bias": t("final_layer_norm.bias", (d,))}
  for i in range(cfg.num_layers):
    src, dst = f"layers.{i}.", f"blocks.{i}."
    for a, b in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")):
      p[dst + b + ".scale"], p[dst + b + ".bias"] = t(src + a + ".weight", (d,)), t(src + a + ".bias", (d,))
    # fused rows are per head: (heads, [q, k, v], head_dim)
    w = t(src + "attention.query_key_value.weight", (3 * h * hd, d)).reshape(h, 3, hd, d)
    for j, name in enumerate("qkv"):
      p[dst + f"attn.qkv.{name}.kernel"] = w[:, j].reshape(h * hd, d).T
    p[dst + "attn.o.kernel"] = t(src + "attention.dense.weight", (d, h * hd)).T
    if att.use_bias:
      b = t(src + "attention.query_key_value.bias", (3 * h * hd,)).reshape(h, 3, hd)
      for j, name in enumerate("qkv"):
        p[dst + f"attn.qkv.{name}.bias"] = b[:, j].reshape(-1)
      p[dst + "attn.o.bias"] = t(src + "attention.dense.bias", (d,))
    p[dst + "mlp.up.kernel"], p[dst + "mlp.up.bias"] = t(src + "mlp.dense_h_to_4h.weight", (f, d)).T, t(src + "mlp.dense_h_to_4h.bias", (f,))
    p[dst + "mlp.down.kernel"], p[dst + "mlp.down.bias"] = t(src + "mlp.dense_4h_to_h.weight", (d, f)).T, t(src + "mlp.dense_4h_to_h.bias", (d,))
  return p


def _param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  abstract = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
  return {".".join(map(str, path)): tuple(v.get_value().shape)
          for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def hf_state_to_params(cfg: ModelConfig, model_type: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The float32 :class:`DecoderLM` parameters (``{"blocks.0.attn.qkv.q.kernel": array, ...}``) of the HF state
  dict ``tensors`` of a ``model_type`` model whose config is ``cfg`` (:func:`hf_model_config`). Every parameter
  of the model is filled; a missing tensor, a shape mismatch or a tensor that fills nothing is a ValueError."""
  if model_type not in MODEL_TYPES:
    raise _err("model_type", model_type, f"not supported (supported: {', '.join(MODEL_TYPES)})")
  prefix, head_names = {"gpt2": ("transformer.", ("lm_head.weight",)),
                        "gpt_neox": ("gpt_neox.", ("embed_out.weight", "lm_head.weight"))}.get(
                            model_type, ("model.", ("lm_head.weight",)))
  t = _Tensors(tensors, _prefix(tensors, prefix))
  build = {"gpt2": _gpt2_params, "gpt_neox": _neox_params}.get(model_type, _llama_params)
  p = build(cfg, t)
  head = [n for n in head_names if t.has(n, prefixed=False)]
  if cfg.tie_embeddings:
    for n in head:  # tied checkpoints may store the embedding again as the head
      if not np.array_equal(t(n, (cfg.vocab_size, cfg.d_model), prefixed=False), p["embed.embedding"]):
        raise ValueError(f"config.json tie_word_embeddings=true, but checkpoint tensor {n!r} differs from the "
                         "token embedding")
  elif not head:
    raise ValueError(f"checkpoint tensor {head_names[0]!r} is missing (tie_word_embeddings is false)")
  else:
    p["head.kernel"] = t(head[0], (cfg.vocab_size, cfg.d_model), prefixed=False).T
  unused = sorted(k for k in tensors if k not in t.used and not BUFFERS.search(k))
  if unused:
    raise ValueError(f"{len(unused)} checkpoint tensor(s) fill no attnlab parameter (an option attnlab does not "
                     f"model?): {unused[:8]}")
  want = _param_shapes(cfg)
  if set(want) != set(p):
    raise ValueError(f"internal: parameters not filled {sorted(set(want) - set(p))}, unknown "
                     f"{sorted(set(p) - set(want))}")
  for k, shape in want.items():
    if tuple(p[k].shape) != shape:
      raise ValueError(f"internal: parameter {k} has shape {p[k].shape}, the model expects {shape}")
  return {k: np.ascontiguousarray(v, np.float32) for k, v in p.items()}


def params_into_model(cfg: ModelConfig, params: dict[str, np.ndarray]) -> DecoderLM:
  """A :class:`DecoderLM` of ``cfg`` holding ``params`` (no random initialisation is kept)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))))
  flat = []
  for path, var in nnx.to_flat_state(state):
    key = ".".join(map(str, path))
    if key not in params:
      raise ValueError(f"parameter {key} is not in the given params")
    flat.append((path, var.replace(jnp.asarray(params[key]))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def read_hf_config(src_dir: str) -> dict[str, Any]:
  path = os.path.join(src_dir, "config.json")
  if not os.path.isdir(src_dir):
    raise ValueError(f"checkpoint directory {src_dir!r} does not exist")
  if not os.path.isfile(path):
    raise ValueError(f"{src_dir} has no config.json")
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: unreadable ({e})") from None
  if not isinstance(config, dict):
    raise ValueError(f"{path}: not a JSON object")
  return config


def hf_tokenizer(src_dir: str) -> HFTokenizer | None:
  """The checkpoint's tokenizer (``tokenizer.json``) with BOS/EOS/PAD from its own files, or None without one."""
  if not os.path.isfile(os.path.join(src_dir, "tokenizer.json")):
    return None
  return HFTokenizer.from_pretrained_dir(src_dir)


def load_weights(src_dir: str) -> dict[str, np.ndarray]:
  """The checkpoint's tensors: its safetensors files, or, when it has none, its ``pytorch_model.bin`` (via torch)."""
  if not any(f.endswith(".safetensors") for f in os.listdir(src_dir)) and has_torch_weights(src_dir):
    return load_torch_checkpoint(src_dir)
  return load_checkpoint(src_dir)


def load_hf(src_dir: str, *, dtype: str = "float32", max_seq_len: int | None = None) -> tuple[ModelConfig, DecoderLM]:
  """``(ModelConfig, DecoderLM)`` of the Hugging Face checkpoint in the local directory ``src_dir``
  (``config.json``, ``*.safetensors`` or a sharded ``model.safetensors.index.json``, else ``pytorch_model.bin`` read
  with torch; optional ``tokenizer.json``).
  Parameters are float32; ``dtype`` is the compute dtype. A tokenizer with ids beyond the checkpoint's
  vocab_size is an error."""
  config = read_hf_config(src_dir)
  cfg = hf_model_config(config, dtype=dtype, max_seq_len=max_seq_len)
  tok = hf_tokenizer(src_dir)
  if tok is not None and tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"{src_dir}/tokenizer.json has {tok.vocab_size} ids, more than the checkpoint's vocab_size "
                     f"{cfg.vocab_size}")
  params = hf_state_to_params(cfg, config["model_type"], load_weights(src_dir))
  return cfg, params_into_model(cfg, params)

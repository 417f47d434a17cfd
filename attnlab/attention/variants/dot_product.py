"""Dot-product attention layer: projections, RoPE, QK-norm, GQA, a score function by name, and sink controls.

    q, k, v = x W_q, x W_k, x W_v;  q, k <- RoPE(QKNorm(q, k))
    o = attend(q, [k*; k], [v*; v], score=..., sink_logits=...)   (k*, v*: optional learned sink slot)
    y = (o * sigma(x W_g)) W_o                                        (optional output gate)

Sink controls (each one flag in :class:`AttentionConfig`):
  * ``sink_logit``: per-head learnable logit in the softmax denominator (gpt-oss; 0 = softmax-off-by-one).
  * ``sink_token``: one learned key/value pair per kv head prepended to the keys, visible to every query
    (StreamingLLM's learnable placeholder sink, Xiao et al. 2024), with no position (RoPE is not applied to it).
  * ``key_bias``: a learned key slot whose value is fixed at 0 (Gu et al. 2025, "sink as key bias", Table 4).
  * ``value_bias``: a learned value slot (key 0 unless ``key_bias``/``sink_token``) (Gu et al. 2025).
  * ``gate``: sigmoid output gate, elementwise or head-wise (Qiu et al. 2025, "Gated Attention for LLMs").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.attention.config import AttentionConfig
from attnlab.attention.core import attend, attention_weights
from attnlab.attention.masks import causal_mask, segment_mask
from attnlab.attention.registry import register_attention
from attnlab.layers import apply_2d, apply_rope, kernel_init


class QKVProjection(nnx.Module):
  """The q/k/v projections, QK-norm and RoPE shared by every softmax-like attention module."""

  def __init__(self, cfg: AttentionConfig, d_model: int, *, init: str, rngs: nnx.Rngs, dtype=jnp.float32):
    self.cfg = cfg
    self.head_dim = cfg.resolved_head_dim(d_model)
    lin = lambda o, axes: nnx.Linear(d_model, o, use_bias=cfg.use_bias, kernel_init=kernel_init(init, axes),
                                     dtype=dtype, rngs=rngs)
    self.q = lin(cfg.num_heads * self.head_dim, ("embed", "heads"))
    self.k = lin(cfg.kv_heads * self.head_dim, ("embed", "kv_heads"))
    self.v = lin(cfg.kv_heads * self.head_dim, ("embed", "kv_heads"))
    if cfg.qk_norm:
      self.q_norm = nnx.RMSNorm(self.head_dim, dtype=dtype, rngs=rngs)
      self.k_norm = nnx.RMSNorm(self.head_dim, dtype=dtype, rngs=rngs)
    else:
      self.q_norm = self.k_norm = None

  def __call__(self, x: jax.Array, positions: jax.Array):
    b, t, _ = x.shape
    q = apply_2d(self.q, x).reshape(b, t, self.cfg.num_heads, self.head_dim)
    k = apply_2d(self.k, x).reshape(b, t, self.cfg.kv_heads, self.head_dim)
    v = apply_2d(self.v, x).reshape(b, t, self.cfg.kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.cfg.rope:
      q = apply_rope(q, positions, self.cfg.rope_base)
      k = apply_rope(k, positions, self.cfg.rope_base)
    return q, k, v


class OutputGate(nnx.Module):
  """``o * sigma(x W_g)``, elementwise (one gate per head channel) or head-wise (one per head)."""

  def __init__(self, mode: str, d_model: int, num_heads: int, head_dim: int, *, init: str, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.mode = mode
    out = num_heads * head_dim if mode == "elementwise" else num_heads
    axes = ("embed", "heads") if mode == "elementwise" else ("embed", None)
    self.proj = nnx.Linear(d_model, out, use_bias=True, kernel_init=kernel_init(init, axes), dtype=dtype,
                           rngs=rngs)

  def __call__(self, x: jax.Array, o: jax.Array) -> jax.Array:
    b, t, h, d = o.shape
    g = jax.nn.sigmoid(self.proj(x).astype(jnp.float32))
    g = g.reshape(b, t, h, d) if self.mode == "elementwise" else g.reshape(b, t, h, 1)
    return (o.astype(jnp.float32) * g).astype(o.dtype)


def self_attention_mask(cfg: AttentionConfig, seq: int, segment_ids: jax.Array | None) -> jax.Array:
  """(batch|1, 1, seq, seq) causal (if cfg.causal) AND same-segment mask."""
  mask = causal_mask(seq, seq)[None, None] if cfg.causal else jnp.ones((1, 1, seq, seq), bool)
  if segment_ids is not None:
    mask = jnp.logical_and(mask, segment_mask(segment_ids, segment_ids)[:, None])
  return mask


class HeadsOutput:
  """Mixin for softmax-like layers: ``W_o``, the optional per-head sink logits and the output gate.

  ``_init_output`` creates ``self.o`` and ``self.sink_logits``; ``_out(x, o)`` gates the heads (if ``self.gate``)
  and projects (batch, seq, heads, head_dim) back to (batch, seq, d_model).
  """

  def _init_output(self, cfg: AttentionConfig, d_model: int, head_dim: int, *, init: str, rngs: nnx.Rngs, dtype):
    self.o = nnx.Linear(cfg.num_heads * head_dim, d_model, use_bias=cfg.use_bias,
                        kernel_init=kernel_init(init, ("heads", "embed")), dtype=dtype, rngs=rngs)
    self.sink_logits = nnx.Param(jnp.full((cfg.num_heads,), cfg.sink_logit_init, jnp.float32)) if cfg.sink_logit \
        else None

  def _sinks(self) -> jax.Array | None:
    return None if self.sink_logits is None else self.sink_logits[...]

  def _out(self, x: jax.Array, o: jax.Array) -> jax.Array:
    if self.gate is not None:
      o = self.gate(x, o)
    return apply_2d(self.o, o.reshape(o.shape[0], o.shape[1], -1))


def make_gate(cfg: AttentionConfig, d_model: int, head_dim: int, *, init: str, rngs: nnx.Rngs, dtype):
  return OutputGate(cfg.gate, d_model, cfg.num_heads, head_dim, init=init, rngs=rngs, dtype=dtype) if cfg.gate \
      else None


class DotProductAttention(HeadsOutput, nnx.Module):
  def __init__(self, cfg: AttentionConfig, d_model: int, *, rngs: nnx.Rngs, init: str = "gpt", dtype=jnp.float32):
    if cfg.sink_logit and cfg.score != "softmax":
      raise ValueError(f"sink_logit needs score='softmax'; got {cfg.score!r}")
    self.cfg = cfg
    self.qkv = QKVProjection(cfg, d_model, init=init, rngs=rngs, dtype=dtype)
    hd = self.qkv.head_dim
    self._init_output(cfg, d_model, hd, init=init, rngs=rngs, dtype=dtype)
    slot = nnx.initializers.normal(1.0 / hd ** 0.5)
    self.sink_key = nnx.Param(slot(rngs.params(), (cfg.kv_heads, hd))) if (cfg.sink_token or cfg.key_bias) \
        else None
    self.sink_value = nnx.Param(slot(rngs.params(), (cfg.kv_heads, hd))) if (cfg.sink_token or cfg.value_bias) \
        else None
    self.gate = make_gate(cfg, d_model, hd, init=init, rngs=rngs, dtype=dtype)

  def _with_sink_slot(self, k, v, mask):
    """Prepends the learned (or zero) sink key/value slot; every query sees it."""
    b, _, hkv, d = k.shape
    zeros = jnp.zeros((hkv, d), k.dtype)
    k_slot = zeros if self.sink_key is None else self.sink_key[...].astype(k.dtype)
    v_slot = zeros if self.sink_value is None else self.sink_value[...].astype(v.dtype)
    k = jnp.concatenate([jnp.broadcast_to(k_slot, (b, 1, hkv, d)), k], axis=1)
    v = jnp.concatenate([jnp.broadcast_to(v_slot, (b, 1, hkv, d)), v], axis=1)
    mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (1,), bool), mask], axis=-1)
    return k, v, mask

  def __call__(self, x, *, positions, segment_ids=None, return_internals=False):
    cfg = self.cfg
    b, t, _ = x.shape
    q, k, v = self.qkv(x, positions)
    sinks = self._sinks()
    if cfg.has_sink_slot:
      k, v, mask = self._with_sink_slot(k, v, self_attention_mask(cfg, t, segment_ids))
      kw = dict(causal=False, mask=mask)
    else:
      kw = dict(causal=cfg.causal, segment_ids=segment_ids)
    o = attend(q, k, v, score=cfg.score, sink_logits=sinks, impl=cfg.impl, **kw, **cfg.score_kwargs)
    y = self._out(x, o)
    aux = {}
    if return_internals:
      w = attention_weights(q, k, score=cfg.score, sink_logits=sinks, **kw, **cfg.score_kwargs)
      if cfg.has_sink_slot:
        sink_mass, w = w[..., 0], w[..., 1:]
      else:
        sink_mass = 1.0 - w.sum(-1) if sinks is not None else jnp.zeros(w.shape[:-1], w.dtype)
      real = slice(1, None) if cfg.has_sink_slot else slice(None)
      aux = dict(weights=w, sink_mass=sink_mass, queries=q, keys=k[:, real], values=v[:, real])
    return y, aux


register_attention("dot_product", AttentionConfig)(DotProductAttention)

"""Dot-product attention layer: projections, RoPE, QK-norm, GQA, a score function by name, and sink controls.

    q, k, v = x W_q, x W_k, x W_v;  q, k <- RoPE(QKNorm(q, k))            (:mod:`attnlab.attention.projections`)
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
from attnlab.ops.dense import attention_weights
from attnlab.attention.dispatch import attend
from attnlab.ops.masks import self_attention_mask
from attnlab.attention.projections import HeadsOutput, QKVProjection, make_gate
from attnlab.attention.registry import register_attention


class DotProductAttention(HeadsOutput, nnx.Module):
  def __init__(self, cfg: AttentionConfig, d_model: int, *, rngs: nnx.Rngs, init: str = "gpt", dtype=jnp.float32):
    self.cfg = cfg
    self.qkv = QKVProjection.for_config(cfg, d_model, init=init, rngs=rngs, dtype=dtype)
    hd = self.qkv.head_dim
    self.init_output(cfg, d_model, hd, init=init, rngs=rngs, dtype=dtype)
    slot = nnx.initializers.normal(1.0 / hd ** 0.5)
    self.sink_key = nnx.Param(slot(rngs.params(), (cfg.kv_heads, hd))) if (cfg.sink_token or cfg.key_bias) \
        else None
    self.sink_value = nnx.Param(slot(rngs.params(), (cfg.kv_heads, hd))) if (cfg.sink_token or cfg.value_bias) \
        else None
    self.gate = make_gate(cfg, d_model, hd, init=init, rngs=rngs, dtype=dtype)

  def with_sink_slot(self, k, v, mask):
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
    sinks = self.sinks()
    if cfg.has_sink_slot:
      k, v, mask = self.with_sink_slot(k, v, self_attention_mask(t, segment_ids, causal=cfg.causal))
      kw = dict(causal=False, mask=mask)
    else:
      kw = dict(causal=cfg.causal, segment_ids=segment_ids)
    o = attend(q, k, v, score=cfg.score, sink_logits=sinks, impl=cfg.impl, **kw, **cfg.score_kwargs)
    y = self.output(x, o)
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

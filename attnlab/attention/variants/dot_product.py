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
  * ``window``: sliding-window attention, ``i - W < j <= i`` (the sink slot stays visible).

Decoding (the protocol of :mod:`attnlab.attention.cache`): a dense :class:`KVCache` for every score function,
GQA and sink control, under any :class:`CachePolicy` (full, ring window, StreamingLLM sink + window).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.attention.cache import (FULL, CachePolicy, KVCache, check_position, check_prompt, parse_policy,
                                     window_mask)
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
    if cfg.has_sink_slot:  # the slot is key 0 and visible to every query, inside a window or not
      mask = self_attention_mask(t, segment_ids, causal=cfg.causal)
      if cfg.window is not None:
        mask = mask & window_mask(positions[:, None], positions[:, None], cfg.window)
      k, v, mask = self.with_sink_slot(k, v, mask)
      kw = dict(causal=False, mask=mask)
    else:
      kw = dict(causal=cfg.causal, segment_ids=segment_ids, window=cfg.window)
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

  # --- decoding (attnlab.attention.cache) ---

  def layer_policy(self, policy: str | CachePolicy) -> CachePolicy:
    """``policy`` as this layer serves it: a layer with ``cfg.window = W`` keeps a ring of W under "full" and
    the smaller window under "window:W'"; a sink policy cannot serve it (it would show tokens the layer never
    saw)."""
    policy, cfg = parse_policy(policy), self.cfg
    if not cfg.causal:
      raise ValueError("AttentionConfig.causal=False: a non-causal layer cannot be decoded with a cache")
    if cfg.window is None:
      return policy
    if policy.n_sink:
      raise ValueError(f"cache_policy={policy.name!r} cannot serve a layer with AttentionConfig.window="
                       f"{cfg.window} (its sinks would be outside the window); use 'full' or 'window:W'")
    return CachePolicy(0, cfg.window if policy.window is None else min(cfg.window, policy.window))

  def init_cache(self, batch: int, max_len: int, *, policy: str | CachePolicy = FULL,
                 dtype=jnp.float32) -> KVCache:
    lp = self.layer_policy(policy)
    shift = lp.pos_shift and lp.n_sink > 0 and self.qkv.rope_base is not None
    return KVCache.empty(batch, max_len, self.qkv.kv_heads, self.qkv.head_dim, n_sink=lp.n_sink, window=lp.window,
                         rotated=not shift, dtype=dtype)

  def _attend_cached(self, x, q, keys, values, mask):
    cfg = self.cfg
    if cfg.has_sink_slot:
      keys, values, mask = self.with_sink_slot(keys, values, mask)
    impl = "xla" if cfg.impl == "pallas" else cfg.impl  # the flash kernel takes no mask
    o = attend(q, keys, values, score=cfg.score, causal=False, mask=mask, sink_logits=self.sinks(), impl=impl,
               **cfg.score_kwargs)
    return self.output(x, o)

  def prefill(self, x, *, positions, cache: KVCache):
    """The prompt x (batch, n, d_model) at ``positions`` (batch, n) into an empty cache; ``(y, cache)`` with y
    equal to the forward's. Under a position-shifting sink policy the prompt runs token by token."""
    b, n, _ = x.shape
    check_prompt(n, cache.max_len)
    if not cache.rotated:
      def body(c, inp):
        y, c = self.step(inp[0][:, None], position=inp[1], cache=c)
        return c, y[:, 0]
      cache, ys = jax.lax.scan(body, cache, (jnp.moveaxis(x, 1, 0), positions[0]))
      return jnp.moveaxis(ys, 0, 1), cache
    q, k, v = self.qkv(x, positions)
    pos = positions[0]
    # The prompt attends to itself (the cache is empty): the forward's keys, with the policy's visibility.
    mask = window_mask(pos, pos, cache.window, cache.n_sink)[None, None]
    mask = jnp.broadcast_to(mask, (b, 1, n, n))
    return self._attend_cached(x, q, k, v, mask), cache.write(k, v, pos)

  def step(self, x, *, position, cache: KVCache):
    """One token x (batch, 1, d_model) at ``position`` (int ()); ``(y, cache)``."""
    check_position(position, cache.max_len)
    b = x.shape[0]
    p = jnp.asarray(position, jnp.int32).reshape(())
    pos = jnp.broadcast_to(p, (b, 1))
    if cache.rotated:
      q, k, v = self.qkv(x, pos)
    else:  # keys cached before RoPE, re-rotated by their rank in the cache
      q, k, v = self.qkv.project(x)
      q, k = self.qkv.normalize(q, k)
    cache = cache.write(k, v, p[None])
    keys = cache.keys
    if not cache.rotated:
      key_pos, query_pos = cache.shifted_positions(p)
      q = self.qkv.rotate(q, jnp.broadcast_to(query_pos, (b, 1)))
      keys = self.qkv.rotate(keys, jnp.broadcast_to(key_pos, (b, cache.slots)))
    mask = window_mask(p[None], cache.positions, cache.window, cache.n_sink)
    mask = jnp.broadcast_to(mask[None, None], (b, 1, 1, cache.slots))
    return self._attend_cached(x, q, keys, cache.values, mask), cache


register_attention("dot_product", AttentionConfig)(DotProductAttention)

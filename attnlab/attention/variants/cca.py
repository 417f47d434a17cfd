"""Core Context Aware (CCA) attention layer (Chen et al., "Core Context Aware Transformers for Long Context
Language Modeling", ICML 2025; code chenyaofo/CCA-Attention@052cc8e).

    q, k, v = RoPE(x W_q), RoPE(x W_k), x W_v
    k^c_p, v^c_p = sum_j softmax_j(q_{pg+g-1} . k_{pg+j} / sqrt(d)) (k, v)_{pg+j}      (core token of group p)
    o_t = score(q_t [K^c_{p < c(t)} ; K_{c(t)g..t}]^T scale) [V^c ; V],  c(t) = max(0, floor((t+1-s)/g))
    y = o W_o

Reuses the projections/RoPE/QK-norm of the dot-product layer; supports GQA, any registered score function,
``sink_logit`` and the output ``gate``. Sink slots (``sink_token``, ``key_bias``, ``value_bias``) and packed
``segment_ids`` are refused: the paper defines neither (a pooled group may straddle documents).

Decoding (the protocol of :mod:`attnlab.attention.cache`): the compressed cache of :mod:`attnlab.attention.cca
.decode` (core tokens + a buffer of at most s + g raw tokens), policy "full" only (CCA is its own compression).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from attnlab.attention.cache import FULL, CachePolicy, check_full_only, check_position, check_prompt, parse_policy
from attnlab.attention.cca import (CCA_IMPLS, CCACache, cca_attention, cca_decode_step, cca_init_cache, cca_prefill,
                                   cca_weights, check_cca_impl, check_cca_params)
from attnlab.attention.config import GroupedKV, OutputGateField, QKNorm, SinkLogit
from attnlab.attention.registry import register_attention
from attnlab.attention.projections import HeadsOutput, QKVProjection, make_gate


@dataclasses.dataclass(frozen=True)
class CCAConfig(SinkLogit, OutputGateField, QKNorm, GroupedKV):
  """CCA attention: ``group_size`` g tokens per core token, ``window_size`` s raw tokens of locality window
  (s % g == 0; the paper's defaults are g = 16, s = 1024). ``impl``: ``"auto"`` (the blocked flash core for
  softmax, ``"xla"`` otherwise), ``"blocked"`` or ``"xla"`` (see :mod:`attnlab.attention.cca.forward`).
  ``block_q`` queries per block; ``remat`` recomputes the ``"xla"`` path's blocks in the backward pass."""

  IMPLS = CCA_IMPLS
  impl: str = "auto"
  group_size: int = 16
  window_size: int = 64
  block_q: int = 512
  remat: bool = True

  def __post_init__(self):
    super().__post_init__()
    check_cca_params(self.group_size, self.window_size)
    if self.block_q < 1:
      raise ValueError(f"block_q must be >= 1; got {self.block_q}")
    check_cca_impl(self.impl, self.score, field="CCAConfig.impl")

  @property
  def cca_kwargs(self) -> dict:
    return dict(group_size=self.group_size, window_size=self.window_size, score=self.score, **self.score_kwargs)


class CCAAttention(HeadsOutput, nnx.Module):
  def __init__(self, cfg: CCAConfig, d_model: int, *, rngs: nnx.Rngs, init: str = "gpt", dtype=jnp.float32):
    self.cfg = cfg
    self.qkv = QKVProjection.for_config(cfg, d_model, init=init, rngs=rngs, dtype=dtype)
    hd = self.qkv.head_dim
    self.init_output(cfg, d_model, hd, init=init, rngs=rngs, dtype=dtype)
    self.gate = make_gate(cfg, d_model, hd, init=init, rngs=rngs, dtype=dtype)

  def __call__(self, x, *, positions, segment_ids=None, return_internals=False):
    if segment_ids is not None:
      raise ValueError("CCA attention does not support packed segment_ids (groups would straddle documents)")
    cfg = self.cfg
    q, k, v = self.qkv(x, positions)
    o = cca_attention(q, k, v, sink_logits=self.sinks(), block_q=cfg.block_q, remat=cfg.remat, impl=cfg.impl,
                      **cfg.cca_kwargs)
    y = self.output(x, o)
    aux = {}
    if return_internals:
      w = cca_weights(q, k, sink_logits=self.sinks(), **cfg.cca_kwargs)
      sink_mass = 1.0 - w.sum(-1) if self.sink_logits is not None else jnp.zeros(w.shape[:-1], w.dtype)
      aux = dict(weights=w, sink_mass=sink_mass, queries=q, keys=k, values=v)
    return y, aux

  def init_cache(self, batch: int, max_len: int, *, policy: str | CachePolicy = FULL,
                 dtype=jnp.float32) -> CCALayerCache:
    check_full_only(parse_policy(policy), "cca", "it keeps its own compressed cache")
    cfg = self.cfg
    inner = cca_init_cache(batch, max_len, cfg.num_heads, self.qkv.kv_heads, self.qkv.head_dim,
                           group_size=cfg.group_size, window_size=cfg.window_size, dtype=dtype)
    return CCALayerCache(inner, max_len=max_len)

  def prefill(self, x: jax.Array, *, positions: jax.Array, cache: CCALayerCache):
    """Forward over a prompt (batch, n, d_model) into an empty cache: ``(y, cache)``."""
    check_prompt(x.shape[1], cache.max_len)
    q, k, v = self.qkv(x, positions)
    o, inner = cca_prefill(q, k, v, max_len=cache.max_len, sink_logits=self.sinks(), block_q=self.cfg.block_q,
                           impl=self.cfg.impl, **self.cfg.cca_kwargs)
    return self.output(x, o), cache.replace(inner=inner)

  def step(self, x: jax.Array, *, position, cache: CCALayerCache):
    """One token (batch, 1, d_model) at ``position`` against the compressed cache."""
    check_position(position, cache.max_len)
    q, k, v = self.qkv(x, jnp.broadcast_to(jnp.asarray(position, jnp.int32), (x.shape[0], 1)))
    o, inner = cca_decode_step(cache.inner, q, k, v, sink_logits=self.sinks(), **self.cfg.cca_kwargs)
    return self.output(x, o), cache.replace(inner=inner)


@struct.dataclass
class CCALayerCache:
  """:class:`CCACache` (core tokens, raw buffer, counters) and its static ``max_len``."""

  inner: CCACache
  max_len: int = struct.field(pytree_node=False)

  def logical_axes(self) -> CCALayerCache:
    core, raw = P("batch", None, "kv_heads", None, None), P("batch", None, "kv_heads", None)
    return self.replace(inner=CCACache(core, core, P("batch", None, "heads", None), raw, raw, P(), P(), P()))


register_attention("cca", CCAConfig)(CCAAttention)

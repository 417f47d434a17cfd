"""Routing Transformer attention layer (Roy, Saffar, Vaswani, Grangier, TACL 2021): routing heads beside local
heads, with online k-means centroids carried as non-trainable state.

Routing heads (the first ``num_routing_heads``) share queries and keys::

    x̂ = LN(x W_q) (no scale/bias),  c(t) = argmax_c x̂_t·μ_c,  o = clustered attention of RoPE(x̂), x W_v
    aux_loss = β · mean((x̂ − sg(μ_{c(t)}))²)

with the ``nearest`` (causal, default) or ``balanced`` (google-research reference, non-causal) rule of
:mod:`attnlab.attention.routing.clustered`. Local heads use their own q/k/v (:class:`QKVProjection`, so RoPE and
QK-norm apply to them) and blocked local causal attention. ``y = [o_routing; o_local] W_o``.

The centroids follow the EMA k-means of :mod:`attnlab.attention.routing.kmeans`, updated from every forward pass
in training mode. Following the NNX convention the mode is the ``deterministic`` attribute that
``model.train()`` / ``model.eval()`` set; the state lives in :class:`KMeansState` variables (not ``nnx.Param``):
optimizers built with ``wrt=nnx.Param`` ignore them, ``nnx.jit``/``nnx.value_and_grad`` carry their updates out
of a step, and checkpoints of ``nnx.state(model)`` keep them.

``window`` is a fixed config value (default 32), never derived from the input length, so the layer is
prefix-consistent: its outputs on ``x[:, :t]`` are the first t outputs on ``x`` (with the ``nearest`` rule).

Decoding (the protocol of :mod:`attnlab.attention.cache`, policy "full", ``nearest`` rule, frozen centroids):
per routing head and cluster a ring of the ``window`` most recent members (keys = queries, values), and for the
local heads a ring of the last ``2 L`` tokens. A new token is routed to its nearest centroid, joins that cluster's
ring and attends to it -- exactly the forward's "window most recent members of my cluster". The ``balanced`` rule
cannot be decoded: its top-w membership of a cluster is decided over the whole sequence, future tokens included.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from attnlab.attention.cache import FULL, CachePolicy, KVCache, check_full_only, check_position, check_prompt, \
    parse_policy
from attnlab.attention.config import QKNorm
from attnlab.ops.dense import attention_weights
from attnlab.attention.dispatch import attend
from attnlab.ops.masks import self_attention_mask
from attnlab.attention.projections import QKVProjection
from attnlab.attention.registry import register_attention
from attnlab.attention.routing import (ROUTINGS, balanced_assignment, balanced_attention, commitment_loss,
                                       kmeans_ema_update, layer_norm, local_attention, local_mask,
                                       nearest_attention, nearest_centroid, routing_weights)
from attnlab.layers import apply_rope, kernel_init


@dataclasses.dataclass(frozen=True)
class RoutingConfig(QKNorm):
  """Routing attention. ``num_heads`` = ``num_routing_heads`` routing heads + the rest local heads.

  ``window`` (w): each routing query attends to the w most recent members of its cluster (``nearest``) or a
  cluster holds the top w tokens (``balanced``). A fixed value (default 32, set it to about ``seq_len /
  num_clusters``; the paper's O(n^1.5) setting is ``k ≈ √n``): a length-dependent window would change earlier
  outputs as the sequence grows. ``routing_scale`` defaults to ``1/√head_dim`` (google-research uses 1 on the layer-normed x̂).
  """

  num_routing_heads: int = 2
  num_clusters: int = 8
  window: int = 32
  routing: str = "nearest"  # "nearest": causal (LM default); "balanced": the reference top-w rule (not causal)
  local_block: int = 64
  routing_scale: float | None = None
  kmeans_decay: float = 0.999
  kmeans_eps: float = 1e-5
  commitment: float = 1e-4

  def __post_init__(self):
    super().__post_init__()
    if self.routing not in ROUTINGS:
      raise ValueError(f"routing must be one of {ROUTINGS}; got {self.routing!r}")
    if not 0 <= self.num_routing_heads <= self.num_heads:
      raise ValueError(f"num_routing_heads must be in [0, num_heads={self.num_heads}]; got {self.num_routing_heads}")
    if self.num_clusters <= 0 or self.window is None or self.window <= 0 or self.local_block <= 0:
      raise ValueError(f"num_clusters, window and local_block must be positive; got {self.num_clusters}, "
                       f"{self.window}, {self.local_block}")
    if not 0.0 < self.kmeans_decay < 1.0:
      raise ValueError(f"kmeans_decay must be in (0, 1); got {self.kmeans_decay}")

  @property
  def num_local_heads(self) -> int:
    return self.num_heads - self.num_routing_heads



class KMeansState(nnx.Variable):
  """Non-trainable k-means state (centroids and their EMA statistics); updated by the forward pass, not SGD."""


class RoutingAttention(nnx.Module):
  def __init__(self, cfg: RoutingConfig, d_model: int, *, rngs: nnx.Rngs, init: str = "gpt", dtype=jnp.float32):
    if not isinstance(cfg, RoutingConfig):
      raise ValueError(f"RoutingAttention needs a RoutingConfig; got {type(cfg).__name__}")
    self.cfg = cfg
    self.deterministic = False  # NNX convention: model.eval() -> True (no k-means update), model.train() -> False
    hd = self.head_dim = cfg.resolved_head_dim(d_model)
    hr = cfg.num_routing_heads
    lin = lambda i, o, axes: nnx.Linear(i, o, use_bias=cfg.use_bias, kernel_init=kernel_init(init, axes),
                                        dtype=dtype, rngs=rngs)
    self.route_q = lin(d_model, hr * hd, ("embed", "heads")) if hr else None
    self.route_v = lin(d_model, hr * hd, ("embed", "heads")) if hr else None
    self.local_qkv = QKVProjection.for_config(cfg, d_model, num_heads=cfg.num_local_heads, init=init, rngs=rngs,
                                              dtype=dtype) if cfg.num_local_heads else None
    self.o = lin(cfg.num_heads * hd, d_model, ("heads", "embed"))
    if hr:
      mu = layer_norm(jax.random.normal(rngs.params(), (hr, cfg.num_clusters, hd)))  # google-research: LN(N(0, 1))
      self.centroids = KMeansState(mu)
      self.ema_count = KMeansState(jnp.ones((hr, cfg.num_clusters), jnp.float32))  # the init counts as 1 sample
      self.ema_sum = KMeansState(jnp.array(mu, copy=True))  # own buffer: the train step donates both
    else:
      self.centroids = self.ema_count = self.ema_sum = None

  def _route_features(self, x, positions):
    """(x̂, RoPE(x̂), values, cluster) of the routing heads."""
    cfg, hd = self.cfg, self.head_dim
    b, n, _ = x.shape
    r = layer_norm(self.route_q(x).reshape(b, n, cfg.num_routing_heads, hd))
    v = self.route_v(x).reshape(b, n, cfg.num_routing_heads, hd)
    qk = apply_rope(r, positions, cfg.rope_base) if cfg.rope else r
    return r, qk, v, nearest_centroid(r, self.centroids[...])

  def _routing(self, x, positions, segment_ids, return_internals):
    cfg = self.cfg
    n = x.shape[1]
    r, qk, v, cluster = self._route_features(x, positions)
    mu = self.centroids[...]
    w = cfg.window
    kw = dict(scale=cfg.routing_scale, segment_ids=segment_ids)
    if cfg.routing == "nearest":
      idx = None
      o = nearest_attention(qk, v, cluster, window=w, **kw)
    else:
      w = min(w, n)
      idx = balanced_assignment(r, mu, w)
      o = balanced_attention(qk, v, idx, **kw)
    loss = commitment_loss(r, mu, cluster, cfg.commitment)
    if not self.deterministic:
      count, total, new_mu = kmeans_ema_update(self.ema_count[...], self.ema_sum[...], r, cluster,
                                               decay=cfg.kmeans_decay, eps=cfg.kmeans_eps)
      self.ema_count[...], self.ema_sum[...], self.centroids[...] = count, total, new_mu
    internals = {}
    if return_internals:
      internals = dict(weights=routing_weights(qk, routing=cfg.routing, window=w, idx=idx, cluster=cluster, **kw),
                       queries=qk, keys=qk, values=v, clusters=cluster)
    return o.astype(x.dtype), loss, internals

  def _local(self, x, positions, segment_ids, return_internals):
    cfg = self.cfg
    q, k, v = self.local_qkv(x, positions)
    o = local_attention(q, k, v, block=cfg.local_block, segment_ids=segment_ids)
    internals = {}
    if return_internals:
      mask = local_mask(x.shape[1], cfg.local_block)[None, None] & self_attention_mask(x.shape[1], segment_ids)
      internals = dict(weights=attention_weights(q, k, causal=False, mask=mask), queries=q, keys=k, values=v)
    return o, internals

  def __call__(self, x, *, positions, segment_ids=None, return_internals=False):
    b, n, _ = x.shape
    outs, parts, aux = [], [], {}
    if self.route_q is not None:
      o, aux["aux_loss"], internals = self._routing(x, positions, segment_ids, return_internals)
      outs.append(o)
      parts.append(internals)
    if self.local_qkv is not None:
      o, internals = self._local(x, positions, segment_ids, return_internals)
      outs.append(o)
      parts.append(internals)
    y = self.o(jnp.concatenate(outs, axis=2).reshape(b, n, -1))
    if return_internals:
      cat = lambda key, axis: jnp.concatenate([p[key] for p in parts], axis=axis)
      aux.update(weights=cat("weights", 1), queries=cat("queries", 2), keys=cat("keys", 2),
                 values=cat("values", 2))
      aux["sink_mass"] = jnp.zeros(aux["weights"].shape[:-1], aux["weights"].dtype)
      if self.route_q is not None:
        aux["clusters"] = parts[0]["clusters"]
    return y, aux

  # --- decoding (attnlab.attention.cache) ---

  def init_cache(self, batch: int, max_len: int, *, policy: str | CachePolicy = FULL,
                 dtype=jnp.float32) -> RoutingCache:
    cfg, hd = self.cfg, self.head_dim
    check_full_only(parse_policy(policy), "routing", "it keeps its own per-cluster caches")
    if cfg.routing != "nearest":
      raise ValueError(f"RoutingConfig.routing={cfg.routing!r} cannot be decoded: the balanced rule picks each "
                       f"cluster's top-w tokens over the whole sequence (future tokens included); use 'nearest'")
    ring = jnp.zeros((batch, cfg.num_routing_heads, cfg.num_clusters, cfg.window, hd), dtype)
    local = None
    if self.local_qkv is not None:
      local = KVCache.empty(batch, max_len, self.local_qkv.kv_heads, hd, window=2 * cfg.local_block, dtype=dtype)
    return RoutingCache(ring, ring, jnp.zeros((batch, cfg.num_routing_heads, cfg.num_clusters), jnp.int32), local,
                        max_len=max_len)

  def prefill(self, x, *, positions, cache: RoutingCache):
    """The prompt into an empty cache (centroids are not updated): ``(y, cache)`` equal to the forward."""
    cfg = self.cfg
    b, n, _ = x.shape
    check_prompt(n, cache.max_len)
    outs = []
    if self.route_q is not None:
      _, qk, v, cluster = self._route_features(x, positions)
      outs.append(nearest_attention(qk, v, cluster, window=cfg.window, scale=cfg.routing_scale).astype(x.dtype))
      onehot = (cluster[..., None] == jnp.arange(cfg.num_clusters)).astype(jnp.int32)  # (b, n, hr, K)
      rank = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)  # index among the cluster's members
      total = jnp.sum(onehot, axis=1)  # (b, hr, K)
      keep = rank >= jnp.take_along_axis(total[:, None], cluster[..., None], axis=-1)[..., 0] - cfg.window
      slot = jnp.where(keep, rank % cfg.window, cfg.window)  # dropped when not among the last w members
      bi, hi = jnp.arange(b)[:, None, None], jnp.arange(cfg.num_routing_heads)[None, None, :]
      put = lambda ring, val: ring.at[bi, hi, cluster, slot].set(val.astype(ring.dtype), mode="drop")
      cache = cache.replace(keys=put(cache.keys, qk), values=put(cache.values, v), counts=cache.counts + total)
    if self.local_qkv is not None:
      q, k, v = self.local_qkv(x, positions)
      outs.append(local_attention(q, k, v, block=cfg.local_block))
      cache = cache.replace(local=cache.local.write(k, v, positions[0]))
    return self.o(jnp.concatenate(outs, axis=2).reshape(b, n, -1)), cache

  def step(self, x, *, position, cache: RoutingCache):
    """One token (batch, 1, d_model) at ``position``: ``(y, cache)``."""
    check_position(position, cache.max_len)
    cfg = self.cfg
    b = x.shape[0]
    p = jnp.asarray(position, jnp.int32).reshape(())
    pos = jnp.broadcast_to(p, (b, 1))
    outs = []
    if self.route_q is not None:
      _, qk, v, cluster = self._route_features(x, pos)
      c = cluster[:, 0]  # (b, hr)
      bi, hi = jnp.arange(b)[:, None], jnp.arange(cfg.num_routing_heads)[None, :]
      count = cache.counts[bi, hi, c]
      slot = count % cfg.window
      keys = cache.keys.at[bi, hi, c, slot].set(qk[:, 0].astype(cache.keys.dtype))
      values = cache.values.at[bi, hi, c, slot].set(v[:, 0].astype(cache.values.dtype))
      counts = cache.counts.at[bi, hi, c].add(1)
      ring_k, ring_v = keys[bi, hi, c], values[bi, hi, c]  # (b, hr, w, d): my cluster's ring
      valid = jnp.arange(cfg.window) < (count + 1)[..., None]  # (b, hr, w)
      ring_k, ring_v = jnp.moveaxis(ring_k, 1, 2), jnp.moveaxis(ring_v, 1, 2)  # (b, w, hr, d)
      mask = jnp.moveaxis(valid, 1, 0)[:, :, None, None, :]  # (hr, b, 1, 1, w) per head
      o = jax.vmap(lambda q_h, k_h, v_h, m_h: attend(q_h, k_h, v_h, causal=False, mask=m_h,
                                                    scale=cfg.routing_scale),
                   in_axes=(2, 2, 2, 0), out_axes=2)(qk[:, :, :, None], ring_k[:, :, :, None], ring_v[:, :, :, None],
                                                     mask)
      outs.append(o[:, :, :, 0].astype(x.dtype))
      cache = cache.replace(keys=keys, values=values, counts=counts)
    if self.local_qkv is not None:
      q, k, v = self.local_qkv(x, pos)
      local = cache.local.write(k, v, p[None])
      kp, blk = local.positions, cfg.local_block
      mask = (kp >= 0) & (kp <= p) & (kp // blk >= p // blk - 1)
      outs.append(attend(q, local.keys, local.values, causal=False, mask=mask[None, None, None, :]))
      cache = cache.replace(local=local)
    return self.o(jnp.concatenate(outs, axis=2).reshape(b, 1, -1)), cache


@struct.dataclass
class RoutingCache:
  """Per routing head and cluster, a ring of the ``window`` most recent members: ``keys`` (= queries, after RoPE)
  and ``values`` (batch, routing_heads, clusters, window, head_dim), ``counts`` (batch, routing_heads, clusters)
  members seen; ``local``: the local heads' :class:`KVCache` ring of ``2 * local_block`` tokens (or None)."""

  keys: jax.Array
  values: jax.Array
  counts: jax.Array
  local: KVCache | None
  max_len: int = struct.field(pytree_node=False)

  def logical_axes(self) -> RoutingCache:
    ring = P("batch", "heads", None, None, None)
    return self.replace(keys=ring, values=ring, counts=P("batch", "heads", None),
                        local=None if self.local is None else self.local.logical_axes())


register_attention("routing", RoutingConfig)(RoutingAttention)

"""Meta-token attention layer (Shah et al. 2025, "Language Modeling with Learned Meta-Tokens").

A reconstruction (arXiv 2509.16278; the authors published no code): causal multi-head attention plus a separate
meta-attention path with its own projections, summed::

    y = CausalMHA(x) + W_o^meta · MetaAttn(x)          MetaAttn: see :mod:`attnlab.attention.meta_tokens`

Meta tokens are found in the input ids (``meta_ids``); the data side injects them at random positions and
excludes them from the loss (:mod:`attnlab.data.special_tokens`). The causal path is the standard
:class:`DotProductAttention` (all its options apply); ``meta_rope=False`` drops RoPE on the meta path.

Decoding (the protocol of :mod:`attnlab.attention.cache`, policy "full"): the causal path's :class:`KVCache` plus
a cache of the meta path's keys/values with a flag per slot "a meta token among the first ``meta_capacity``";
query t reads the flagged slots ``<= t`` (``meta_only``: only when t is itself a flagged meta token).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from attnlab.attention.cache import FULL, CachePolicy, KVCache, check_full_only, parse_policy
from attnlab.attention.config import AttentionConfig
from attnlab.ops.dense import attention_weights
from attnlab.attention.dispatch import attend
from attnlab.attention.meta_tokens import MODES, meta_attention, meta_attention_mask
from attnlab.attention.projections import QKVProjection
from attnlab.attention.registry import register_attention
from attnlab.attention.special_tokens import MetaTokens
from attnlab.attention.variants.dot_product import DotProductAttention
from attnlab.layers import kernel_init


@dataclasses.dataclass(frozen=True)
class MetaTokenConfig(AttentionConfig):
  """Causal attention + meta-attention. ``meta_ids`` must be valid token ids of the LM (e.g. 259 with
  ``ModelConfig.vocab_size = 260``); ``meta_mode`` is "meta_only" (meta↔meta) or "all" (every query → meta
  keys); ``meta_capacity`` bounds the meta tokens per sequence seen by the meta path (None: no bound);
  ``meta_rate`` is the probability with which the data pipeline injects a meta token before each ordinary token
  (training and held-out batches; a reconstruction choice)."""

  meta_ids: tuple[int, ...] = (259,)
  meta_mode: str = "meta_only"
  meta_capacity: int | None = None
  meta_rope: bool = True
  meta_rate: float = 0.02

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "meta_ids", tuple(int(i) for i in self.meta_ids))
    if not self.meta_ids:
      raise ValueError("meta_ids must name at least one token id")
    if self.meta_mode not in MODES:
      raise ValueError(f"meta_mode must be one of {MODES}; got {self.meta_mode!r}")
    if self.meta_capacity is not None and self.meta_capacity < 1:
      raise ValueError(f"meta_capacity must be positive or None; got {self.meta_capacity}")
    if not 0.0 <= self.meta_rate < 1.0:
      raise ValueError(f"meta_rate must be in [0, 1); got {self.meta_rate}")

  def special_tokens(self) -> MetaTokens:
    """What the data pipeline must interleave into batches for this layer (``DataConfig.special_tokens``)."""
    return MetaTokens(meta_ids=self.meta_ids, rate=self.meta_rate)


class MetaTokenAttention(nnx.Module):
  needs_tokens = True  # attnlab.model.lm.Block passes the input ids (meta tokens are found by id)

  def __init__(self, cfg: MetaTokenConfig, d_model: int, *, rngs: nnx.Rngs, init: str = "gpt", dtype=jnp.float32):
    self.cfg = cfg
    self.causal = DotProductAttention(cfg, d_model, rngs=rngs, init=init, dtype=dtype)
    self.meta_qkv = QKVProjection.for_config(cfg, d_model, rope=cfg.rope and cfg.meta_rope, init=init, rngs=rngs,
                                             dtype=dtype)
    self.meta_o = nnx.Linear(cfg.num_heads * self.meta_qkv.head_dim, d_model, use_bias=cfg.use_bias,
                             kernel_init=kernel_init(init, ("heads", "embed")), dtype=dtype, rngs=rngs)

  def __call__(self, x, *, positions, segment_ids=None, return_internals=False, tokens=None):
    if tokens is None:
      raise ValueError("MetaTokenAttention needs the input token ids (tokens=...) to find the meta tokens")
    if tokens.shape != x.shape[:2]:
      raise ValueError(f"tokens must be (batch, seq) = {x.shape[:2]}; got {tuple(tokens.shape)}")
    cfg = self.cfg
    y, aux = self.causal(x, positions=positions, segment_ids=segment_ids, return_internals=return_internals)
    is_meta = jnp.isin(tokens, jnp.asarray(cfg.meta_ids))
    q, k, v = self.meta_qkv(x, positions)
    o, dropped = meta_attention(q, k, v, is_meta, mode=cfg.meta_mode, capacity=cfg.meta_capacity,
                                segment_ids=segment_ids)
    y = y + self.meta_o(o.reshape(o.shape[0], o.shape[1], -1))
    if return_internals:
      mask = meta_attention_mask(is_meta, cfg.meta_mode, segment_ids)
      aux.update(meta_weights=attention_weights(q, k, causal=False, mask=mask), is_meta=is_meta,
                 meta_dropped=dropped)
    return y, aux

  # --- decoding (attnlab.attention.cache) ---

  def init_cache(self, batch: int, max_len: int, *, policy: str | CachePolicy = FULL,
                 dtype=jnp.float32) -> MetaCache:
    check_full_only(parse_policy(policy), "meta_tokens", "the meta path reads every earlier meta token")
    hkv, hd = self.meta_qkv.kv_heads, self.meta_qkv.head_dim
    zeros = jnp.zeros((batch, max_len, hkv, hd), dtype)
    return MetaCache(self.causal.init_cache(batch, max_len, dtype=dtype), zeros, zeros,
                     jnp.zeros((batch, max_len), bool), jnp.zeros((batch,), jnp.int32), max_len=max_len)

  def _kept(self, is_meta, count):
    """(flag "a meta token within capacity", new count) for tokens is_meta (batch, t) after ``count`` metas."""
    rank = count[:, None] + jnp.cumsum(is_meta, axis=1) - 1
    cap = self.cfg.meta_capacity
    kept = is_meta if cap is None else is_meta & (rank < cap)
    return kept, count + jnp.sum(is_meta, axis=1, dtype=jnp.int32)

  def prefill(self, x, *, positions, cache: MetaCache, tokens):
    """The prompt into an empty cache: ``(y, cache)`` equal to the forward."""
    cfg = self.cfg
    y, causal = self.causal.prefill(x, positions=positions, cache=cache.causal)
    is_meta = jnp.isin(tokens, jnp.asarray(cfg.meta_ids))
    q, k, v = self.meta_qkv(x, positions)
    o, _ = meta_attention(q, k, v, is_meta, mode=cfg.meta_mode, capacity=cfg.meta_capacity)
    y = y + self.meta_o(o.reshape(o.shape[0], o.shape[1], -1))
    kept, count = self._kept(is_meta, cache.count)
    put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), 0, axis=1)
    cache = cache.replace(causal=causal, keys=put(cache.keys, k), values=put(cache.values, v),
                          kept=put(cache.kept, kept), count=count)
    return y, cache

  def step(self, x, *, position, cache: MetaCache, tokens):
    """One token (batch, 1, d_model) with its id ``tokens`` (batch, 1) at ``position``: ``(y, cache)``."""
    cfg = self.cfg
    y, causal = self.causal.step(x, position=position, cache=cache.causal)
    b = x.shape[0]
    p = jnp.asarray(position, jnp.int32).reshape(())
    q, k, v = self.meta_qkv(x, jnp.broadcast_to(p, (b, 1)))
    kept_t, count = self._kept(jnp.isin(tokens, jnp.asarray(cfg.meta_ids)), cache.count)
    put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), p, axis=1)
    keys, values, kept = put(cache.keys, k), put(cache.values, v), put(cache.kept, kept_t)
    mask = (kept & (jnp.arange(cache.max_len) <= p))[:, None, None, :]
    o = attend(q, keys, values, causal=False, mask=mask)
    if cfg.meta_mode == "meta_only":
      o = jnp.where(kept_t[:, :, None, None], o, 0.0)
    y = y + self.meta_o(o.reshape(b, 1, -1))
    return y, cache.replace(causal=causal, keys=keys, values=values, kept=kept, count=count)


@struct.dataclass
class MetaCache:
  """The causal path's :class:`KVCache`; the meta path's keys/values (batch, max_len, kv_heads, head_dim), the
  flag ``kept`` (batch, max_len) of meta tokens within capacity, and ``count`` (batch,) meta tokens seen."""

  causal: KVCache
  keys: jax.Array
  values: jax.Array
  kept: jax.Array
  count: jax.Array
  max_len: int = struct.field(pytree_node=False)

  def logical_axes(self) -> MetaCache:
    kv = P("batch", "seq", "kv_heads", None)
    return self.replace(causal=self.causal.logical_axes(), keys=kv, values=kv, kept=P("batch", "seq"),
                        count=P("batch"))


register_attention("meta_tokens", MetaTokenConfig)(MetaTokenAttention)

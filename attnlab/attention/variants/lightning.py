"""TransNormerLLM token mixer with lightning attention (Qin et al. 2024, "TransNormerLLM"; "Lightning
Attention-2"), the ``NormLinearAttention`` layer of the released TNL models:

    q, k, v, u = x W_q, x W_k, x W_v, x W_u;   q, k <- SiLU(q), SiLU(k);   q, k <- LRPE(q, k)  (optional)
    o = ((q k^T) ⊙ M) v,  M_ij = lambda_h^(i-j) (i >= j)       (lightning attention, no softmax, no normaliser)
    y = (u ⊙ SRMSNorm(o)) W_out,   SRMSNorm(x) = x / sqrt(mean(x^2) + eps)   (over all heads, no gain)

The per-head decay follows ``LightningConfig.decay`` (see :mod:`attnlab.ops.lightning.decay`); it depends on
the layer's depth, which the LM supplies through :meth:`LightningConfig.for_layer`. Decoding (the protocol of
:mod:`attnlab.attention.cache`, policy "full" only): the cache is the recurrent state ``S`` (batch, heads, d, e),
``S_t = lambda S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``; :meth:`prefill` runs the chunked form and returns it,
:meth:`step` continues token by token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from attnlab.attention.cache import FULL, CachePolicy, check_full_only, check_position, check_prompt, parse_policy
from attnlab.attention.config import BaseAttentionConfig
from attnlab.ops.lightning import (DECAYS, lightning_chunked, lightning_naive, lightning_recurrent,
                                         lightning_weights, log_decay)
from attnlab.attention.registry import register_attention
from attnlab.layers import apply_rope, kernel_init
from kernels_pallas.lightning import lightning_attention


@dataclasses.dataclass(frozen=True)
class LightningConfig(BaseAttentionConfig):
  """Lightning (TNL) attention: causal linear attention with per-head decay, no score function, no GQA, no sink
  controls. ``rope`` defaults to off (TNL has no RoPE)."""

  rope: bool = False
  decay: str = "tnl"  # "tnl" (released TNL weights), "fla" (flash-linear-attention) or "none" (lambda = 1)
  layer: int | None = None  # depth of this layer; filled in by the LM (ModelConfig.layer_attention)
  num_layers: int | None = None
  block_size: int = 64  # block length of the chunked form / Pallas kernel
  lrpe: bool = False  # LRPE (Qin et al. 2023): x -> [x cos(theta pos), x sin(theta pos)], learnable theta
  lrpe_base: float = 10_000.0
  scaled: bool = False  # q *= 1/sqrt(d) (fla's default); TNL uses no scale
  norm_eps: float = 1e-6  # SRMSNorm epsilon
  IMPLS = ("chunked", "naive", "pallas")
  impl: str = "chunked"  # "chunked" (jnp), "naive" (dense, O(n^2)) or "pallas" (kernels_pallas.lightning)

  def __post_init__(self):
    super().__post_init__()
    if self.decay not in DECAYS:
      raise ValueError(f"decay must be one of {DECAYS}; got {self.decay!r}")
    if self.block_size <= 0:
      raise ValueError(f"block_size must be positive; got {self.block_size}")
    if (self.layer is None) != (self.num_layers is None):
      raise ValueError("set both layer and num_layers, or neither")
    if self.layer is not None and not 0 <= self.layer < self.num_layers:
      raise ValueError(f"need 0 <= layer < num_layers; got layer={self.layer}, num_layers={self.num_layers}")

  def for_layer(self, layer: int, num_layers: int) -> LightningConfig:
    return self if self.layer is not None else dataclasses.replace(self, layer=layer, num_layers=num_layers)

  def log_decay(self) -> tuple[float, ...]:
    """Per-head ``s_h = -log lambda_h`` of this layer (layer 0 of 1 when the depth is unset)."""
    return tuple(float(s) for s in log_decay(self.decay, self.num_heads, self.layer or 0, self.num_layers or 1))


def srms_norm(x: jax.Array, eps: float) -> jax.Array:
  """Simple RMSNorm (TransNormerLLM): ``x / sqrt(mean(x^2) + eps)`` over the last axis, no gain, float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class Lrpe(nnx.Module):
  """Linearized relative positional encoding: ``x -> [x cos(theta pos), x sin(theta pos)]`` per channel, so
  ``q'_i . k'_j = sum_c q_ic k_jc cos(theta_c (i - j))``; learnable theta (heads, d) from ``base^(-2c/d)``."""

  def __init__(self, num_heads: int, head_dim: int, base: float):
    theta = base ** (-2.0 / head_dim * jnp.arange(head_dim, dtype=jnp.float32))
    self.theta = nnx.Param(jnp.broadcast_to(theta, (num_heads, head_dim)))

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    angle = positions.astype(jnp.float32)[:, :, None, None] * self.theta[...]
    x32 = x.astype(jnp.float32)
    return jnp.concatenate([x32 * jnp.cos(angle), x32 * jnp.sin(angle)], axis=-1).astype(x.dtype)


class LightningAttention(nnx.Module):
  def __init__(self, cfg: LightningConfig, d_model: int, *, rngs: nnx.Rngs, init: str = "gpt", dtype=jnp.float32):
    self.cfg = cfg
    self.head_dim = cfg.resolved_head_dim(d_model)
    hidden = cfg.num_heads * self.head_dim
    self.qkvu = nnx.Linear(d_model, 4 * hidden, use_bias=cfg.use_bias, kernel_init=kernel_init(init, ("embed", "heads")),
                           dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(hidden, d_model, use_bias=cfg.use_bias, kernel_init=kernel_init(init, ("heads", "embed")),
                          dtype=dtype, rngs=rngs)
    self.lrpe = Lrpe(cfg.num_heads, self.head_dim, cfg.lrpe_base) if cfg.lrpe else None
    self.log_decay = cfg.log_decay()  # static floats: the decay is a fixed schedule, not trained
    self.scale = self.head_dim ** -0.5 if cfg.scaled else 1.0

  def _features(self, x, positions):
    cfg = self.cfg
    b, t, _ = x.shape
    q, k, v, u = jnp.split(self.qkvu(x), 4, axis=-1)
    q, k, v = (z.reshape(b, t, cfg.num_heads, self.head_dim) for z in (jax.nn.silu(q), jax.nn.silu(k), v))
    if cfg.rope:
      q, k = apply_rope(q, positions, cfg.rope_base), apply_rope(k, positions, cfg.rope_base)
    if self.lrpe is not None:
      q, k = self.lrpe(q, positions), self.lrpe(k, positions)
    return q, k, v, u

  def _output(self, o, u):
    b, t = o.shape[:2]
    o = srms_norm(o.reshape(b, t, -1), self.cfg.norm_eps)
    return self.out((u.astype(jnp.float32) * o).astype(u.dtype))

  def __call__(self, x, *, positions, segment_ids=None, return_internals=False):
    q, k, v, u = self._features(x, positions)
    s = jnp.asarray(self.log_decay, jnp.float32)
    if self.cfg.impl == "chunked":
      o = lightning_chunked(q, k, v, s, block_size=self.cfg.block_size, scale=self.scale, segment_ids=segment_ids)
    elif self.cfg.impl == "naive":
      o = lightning_naive(q, k, v, s, scale=self.scale, segment_ids=segment_ids)
    else:
      if segment_ids is not None:
        raise ValueError("impl='pallas' does not support segment_ids (packed documents) yet; use impl='chunked'")
      o = lightning_attention(q, k, v, s, block_size=self.cfg.block_size, scale=self.scale)
    aux = {}
    if return_internals:
      aux = dict(weights=lightning_weights(q, k, s, scale=self.scale, segment_ids=segment_ids), queries=q, keys=k,
                 values=v)
    return self._output(o, u), aux

  def init_cache(self, batch: int, max_len: int, *, policy: str | CachePolicy = FULL) -> LightningCache:
    """Empty decoding state (batch, heads, d, e) float32 (d doubles with LRPE)."""
    check_full_only(parse_policy(policy), "lightning", "its cache is a recurrent state")
    d = self.head_dim * (2 if self.lrpe is not None else 1)
    return LightningCache(jnp.zeros((batch, self.cfg.num_heads, d, self.head_dim), jnp.float32), max_len=max_len)

  def prefill(self, x: jax.Array, *, positions: jax.Array, cache: LightningCache):
    """Parallel (chunked) pass over a prompt from the cache's state; returns ``(y, cache)``."""
    check_prompt(x.shape[1], cache.max_len)
    q, k, v, u = self._features(x, positions)
    o, state = lightning_chunked(q, k, v, jnp.asarray(self.log_decay, jnp.float32), block_size=self.cfg.block_size,
                                 scale=self.scale, initial_state=cache.state, return_state=True)
    return self._output(o, u), cache.replace(state=state)

  def step(self, x: jax.Array, *, position, cache: LightningCache):
    """Recurrent decoding of one token x (batch, 1, d_model) at ``position``; returns ``(y, cache)``."""
    check_position(position, cache.max_len)
    positions = jnp.broadcast_to(jnp.asarray(position, jnp.int32), (x.shape[0], 1))
    q, k, v, u = self._features(x, positions)
    o, state = lightning_recurrent(q, k, v, jnp.asarray(self.log_decay, jnp.float32), scale=self.scale,
                                   initial_state=cache.state)
    return self._output(o, u), cache.replace(state=state)


@struct.dataclass
class LightningCache:
  """The recurrent state (batch, heads, d, e) float32 and the static ``max_len``."""

  state: jax.Array
  max_len: int = struct.field(pytree_node=False)

  def logical_axes(self) -> LightningCache:
    return self.replace(state=P("batch", "heads", None, None))


register_attention("lightning", LightningConfig)(LightningAttention)

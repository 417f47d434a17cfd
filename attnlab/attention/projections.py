"""The projections that softmax-like attention layers share: q/k/v (with QK-norm and RoPE), the sigmoid output
gate, and the head output (``W_o`` with the optional per-head sink logits).

    q, k, v = x W_q, x W_k, x W_v;  q, k <- RoPE(QKNorm(q, k))
    y = (o * sigma(x W_g)) W_o          (gate: Qiu et al. 2025, "Gated Attention for Large Language Models",
                                         arXiv 2505.06708; elementwise or one gate per head)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.attention.config import BaseAttentionConfig, OutputGateField, QKNorm, QKVBias, RopeVariants, SinkLogit
from attnlab.layers import RMSNorm, apply_2d, apply_rope, kernel_init


class QKVProjection(nnx.Module):
  """``num_heads`` query heads and ``kv_heads`` key/value heads of size ``head_dim``; RMSNorm on q and k when
  ``qk_norm``; RoPE with ``rope_base`` unless it is None, on the first ``rope_fraction`` of each head's channels
  and with frequencies rescaled by ``rope_scaling`` (:func:`attnlab.layers.apply_rope`)."""

  def __init__(self, d_model: int, *, num_heads: int, kv_heads: int, head_dim: int, use_bias: bool = False,
               qk_norm: bool = False, rope_base: float | None = 10_000.0, init: str, rngs: nnx.Rngs,
               dtype=jnp.float32, qk_norm_eps: float = 1e-6, rope_fraction: float = 1.0, rope_scaling=()):
    self.num_heads, self.kv_heads, self.head_dim, self.rope_base = num_heads, kv_heads, head_dim, rope_base
    self.rope_fraction, self.rope_scaling = rope_fraction, tuple(rope_scaling)
    if rope_base is not None and rope_fraction != 1.0 and int(head_dim * rope_fraction) % 2:
      raise ValueError(f"RoPE needs an even number of rotated channels; head_dim {head_dim} x rope_fraction "
                       f"{rope_fraction} gives {int(head_dim * rope_fraction)}")
    lin = lambda o, axes: nnx.Linear(d_model, o, use_bias=use_bias, kernel_init=kernel_init(init, axes),
                                     dtype=dtype, rngs=rngs)
    self.q = lin(num_heads * head_dim, ("embed", "heads"))
    self.k = lin(kv_heads * head_dim, ("embed", "kv_heads"))
    self.v = lin(kv_heads * head_dim, ("embed", "kv_heads"))
    if qk_norm:
      self.q_norm = RMSNorm(head_dim, qk_norm_eps, dtype=dtype, rngs=rngs)
      self.k_norm = RMSNorm(head_dim, qk_norm_eps, dtype=dtype, rngs=rngs)
    else:
      self.q_norm = self.k_norm = None

  @classmethod
  def for_config(cls, cfg: BaseAttentionConfig, d_model: int, *, num_heads: int | None = None,
                 rope: bool | None = None, init: str, rngs: nnx.Rngs, dtype=jnp.float32) -> QKVProjection:
    """The projection a layer with config ``cfg`` uses (``num_heads``/``rope`` override the config's)."""
    num_heads = cfg.num_heads if num_heads is None else num_heads
    rope = cfg.rope if rope is None else rope
    qkv_bias = cfg.qkv_bias if isinstance(cfg, QKVBias) else None
    extra = dict(qk_norm_eps=cfg.qk_norm_eps) if isinstance(cfg, QKNorm) else {}
    if isinstance(cfg, RopeVariants):
      extra.update(rope_fraction=cfg.rope_fraction, rope_scaling=cfg.rope_scaling)
    return cls(d_model, num_heads=num_heads, kv_heads=min(cfg.kv_heads, num_heads),
               head_dim=cfg.resolved_head_dim(d_model), use_bias=cfg.use_bias if qkv_bias is None else qkv_bias,
               qk_norm=isinstance(cfg, QKNorm) and cfg.qk_norm, rope_base=cfg.rope_base if rope else None,
               init=init, rngs=rngs, dtype=dtype, **extra)

  def project(self, x: jax.Array):
    """(q, k, v) before QK-norm and RoPE: (batch, seq, heads, head_dim)."""
    b, t, _ = x.shape
    q = apply_2d(self.q, x).reshape(b, t, self.num_heads, self.head_dim)
    k = apply_2d(self.k, x).reshape(b, t, self.kv_heads, self.head_dim)
    v = apply_2d(self.v, x).reshape(b, t, self.kv_heads, self.head_dim)
    return q, k, v

  def normalize(self, q: jax.Array, k: jax.Array):
    """QK-norm of (q, k) when the projection has it."""
    return (q, k) if self.q_norm is None else (self.q_norm(q), self.k_norm(k))

  def rotate(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """RoPE of queries or keys ``x`` (batch, seq, heads, head_dim) at ``positions`` with this projection's base,
    rotated fraction and frequency scaling (identity without RoPE)."""
    if self.rope_base is None:
      return x
    return apply_rope(x, positions, self.rope_base, fraction=self.rope_fraction, scaling=self.rope_scaling)

  def __call__(self, x: jax.Array, positions: jax.Array | None):
    q, k, v = self.project(x)
    q, k = self.normalize(q, k)
    return self.rotate(q, positions), self.rotate(k, positions), v


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


def make_gate(cfg: BaseAttentionConfig, d_model: int, head_dim: int, *, init: str, rngs: nnx.Rngs,
              dtype=jnp.float32) -> OutputGate | None:
  """The output gate of a layer whose config is an :class:`OutputGateField` with ``gate`` set, else None."""
  gate = cfg.gate if isinstance(cfg, OutputGateField) else None
  return OutputGate(gate, d_model, cfg.num_heads, head_dim, init=init, rngs=rngs, dtype=dtype) if gate else None


class HeadsOutput:
  """Mixin for softmax-like layers: ``W_o`` (``self.o``), the optional per-head sink logits
  (``self.sink_logits``, when the config is a :class:`SinkLogit` with ``sink_logit``) and the output gate
  (``self.gate``, from :func:`make_gate`).

  ``init_output`` creates ``o`` and the sink logits; ``output(x, o)`` gates the heads and projects
  (batch, seq, heads, head_dim) back to (batch, seq, d_model); ``sinks()`` is the sink-logit array or None.
  """

  def init_output(self, cfg: BaseAttentionConfig, d_model: int, head_dim: int, *, init: str, rngs: nnx.Rngs,
                  dtype):
    self.o = nnx.Linear(cfg.num_heads * head_dim, d_model, use_bias=cfg.use_bias,
                        kernel_init=kernel_init(init, ("heads", "embed")), dtype=dtype, rngs=rngs)
    with_sinks = isinstance(cfg, SinkLogit) and cfg.sink_logit
    self.sink_logits = nnx.Param(jnp.full((cfg.num_heads,), cfg.sink_logit_init, jnp.float32)) if with_sinks \
        else None

  def sinks(self) -> jax.Array | None:
    return None if self.sink_logits is None else self.sink_logits[...]

  def output(self, x: jax.Array, o: jax.Array) -> jax.Array:
    if self.gate is not None:
      o = self.gate(x, o)
    return apply_2d(self.o, o.reshape(o.shape[0], o.shape[1], -1))

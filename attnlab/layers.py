"""Small building blocks shared by attention modules and the LM: RoPE, norms, MLP, initialisers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Parameter initialisers. "pytorch": nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) and nn.Embedding's N(0, 1)
# (sinks form reliably with it in the Bigram-Backcopy recipe, see README "Calibration");
# "gpt": N(0, 0.02) everywhere (GPT-2 / nanoGPT).
INITS = ("gpt", "pytorch")


def _with_axes(initializer, axes: tuple[str | None, ...] | None):
  """Attaches logical axis names (see :mod:`attnlab.parallel.sharding`) to the parameter it creates."""
  return initializer if axes is None else nnx.with_metadata(initializer, logical_axes=tuple(axes))


def kernel_init(init: str, axes: tuple[str | None, ...] | None = None):
  if init == "pytorch":
    return _with_axes(nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), axes)
  if init == "gpt":
    return _with_axes(nnx.initializers.normal(0.02), axes)
  raise ValueError(f"unknown init {init!r}; expected one of {INITS}")


def embed_init(init: str, axes: tuple[str | None, ...] | None = ("vocab", "embed")):
  if init == "pytorch":
    return _with_axes(nnx.initializers.normal(1.0), axes)
  if init == "gpt":
    return _with_axes(nnx.initializers.normal(0.02), axes)
  raise ValueError(f"unknown init {init!r}; expected one of {INITS}")


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), rotate-half convention.

  x: (batch, seq, heads, head_dim) with even head_dim; positions: (batch, seq) integer positions.
  Pair (x_i, x_{i+d/2}) is rotated by angle ``pos * base^(-2i/d)``.
  """
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim; got {head_dim}")
  half = head_dim // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (batch, seq, half)
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def apply_2d(linear: nnx.Linear, x: jax.Array) -> jax.Array:
  """``linear(x)`` over the flattened leading axes: XLA:CPU differentiates a 2-D matmul ~1.5x faster than the
  same contraction over (batch, seq, features) (benchmarks/train_throughput.py)."""
  return linear(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def make_norm(kind: str, dim: int, eps: float, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.Module:
  if kind == "rmsnorm":
    return nnx.RMSNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs)
  if kind == "layernorm":
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs)
  raise ValueError(f"unknown norm {kind!r}; expected 'rmsnorm' or 'layernorm'")


class MLP(nnx.Module):
  """Feed-forward block: SwiGLU ``W_o(silu(W_g x) * W_u x)`` (Shazeer 2020) or ``W_o act(W_u x)`` for gelu/relu."""

  def __init__(self, d_model: int, hidden: int, activation: str, *, init: str, rngs: nnx.Rngs, dtype=jnp.float32):
    if activation not in ("swiglu", "gelu", "relu"):
      raise ValueError(f"unknown MLP activation {activation!r}; expected 'swiglu', 'gelu' or 'relu'")
    self.activation = activation
    lin = lambda i, o, axes: nnx.Linear(i, o, use_bias=False, kernel_init=kernel_init(init, axes), dtype=dtype,
                                        rngs=rngs)
    self.up = lin(d_model, hidden, ("embed", "mlp"))
    self.gate = lin(d_model, hidden, ("embed", "mlp")) if activation == "swiglu" else None
    self.down = lin(hidden, d_model, ("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.activation == "swiglu":
      h = jax.nn.silu(apply_2d(self.gate, x)) * apply_2d(self.up, x)
    else:
      h = (jax.nn.gelu if self.activation == "gelu" else jax.nn.relu)(apply_2d(self.up, x))
    return apply_2d(self.down, h)

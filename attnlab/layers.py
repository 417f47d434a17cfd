"""Small building blocks shared by attention modules and the LM: RoPE, norms, MLP, initialisers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Parameter initialisers. "pytorch": nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) and nn.Embedding's N(0, 1)
# (the initialisation of Guo et al. 2024's Bigram-Backcopy model, arXiv 2410.13835, with which sinks form);
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


ROPE_SCALINGS = ("linear", "llama3")
_ROPE_SCALING_KEYS = {"linear": ("factor",),
                      "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def check_rope_scaling(scaling) -> dict:
  """``scaling`` (a mapping or (name, value) pairs) as a dict, checked: ``{}`` (plain RoPE), ``{"type": "linear",
  "factor": f}`` (positions divided by f) or ``{"type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
  "original_max_position_embeddings"}`` (Llama 3.1's per-frequency rule)."""
  s = dict(scaling)
  if not s:
    return s
  kind = s.get("type")
  if kind not in ROPE_SCALINGS:
    raise ValueError(f"rope_scaling type must be one of {ROPE_SCALINGS}; got {kind!r}")
  need = _ROPE_SCALING_KEYS[kind]
  if set(s) != {"type", *need}:
    raise ValueError(f"rope_scaling of type {kind!r} takes exactly the keys {('type',) + need}; got {sorted(s)}")
  if any(not isinstance(s[k], (int, float)) or isinstance(s[k], bool) or s[k] <= 0 for k in need):
    raise ValueError(f"rope_scaling values must be positive numbers; got {s}")
  if kind == "llama3" and s["high_freq_factor"] <= s["low_freq_factor"]:
    raise ValueError(f"rope_scaling high_freq_factor must exceed low_freq_factor; got {s}")
  return s


def rope_inv_freq(rot_dim: int, base: float = 10_000.0, scaling=()) -> jax.Array:
  """(rot_dim // 2,) float32 inverse frequencies ``base^(-2i/rot_dim)``, rescaled by ``scaling``
  (:func:`check_rope_scaling`). llama3: wavelengths longer than ``L/low_freq_factor`` are divided by ``factor``,
  shorter than ``L/high_freq_factor`` kept, and the band between interpolated linearly in ``L/wavelength``."""
  half = rot_dim // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  s = check_rope_scaling(scaling)
  if not s:
    return inv_freq
  factor = float(s["factor"])
  if s["type"] == "linear":
    return inv_freq / factor
  lo, hi, orig = float(s["low_freq_factor"]), float(s["high_freq_factor"]), float(s["original_max_position_embeddings"])
  wavelen = 2 * jnp.pi / inv_freq
  smooth = (orig / wavelen - lo) / (hi - lo)
  mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  return jnp.where(wavelen > orig / lo, inv_freq / factor, jnp.where(wavelen < orig / hi, inv_freq, mid))


def rope_tables(positions: jax.Array, rot_dim: int, base: float = 10_000.0, scaling=()) -> tuple[jax.Array, jax.Array]:
  """(cos, signed sin) of RoPE's angles ``theta_i = pos * inv_freq_i`` (:func:`rope_inv_freq`), each
  (batch, seq, 1, rot_dim) float32 in the rotate-half layout: ``cos = [cos theta, cos theta]``,
  ``sin = [-sin theta, sin theta]``. Inside one jitted function XLA computes equal tables once (CSE), so every
  layer may call this with the same positions."""
  angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(rot_dim, base, scaling)
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  return jnp.concatenate([cos, cos], axis=-1)[:, :, None], jnp.concatenate([-sin, sin], axis=-1)[:, :, None]


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0, *, fraction: float = 1.0,
               scaling=()) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), rotate-half convention (Hugging Face's channel layout).

  x: (batch, seq, heads, head_dim) with even head_dim; positions: (batch, seq) integer positions.
  Pair (x_i, x_{i+d/2}) is rotated by angle ``theta_i = pos * base^(-2i/d)``:

      rope(x) = x * [cos theta, cos theta] + [x_2, x_1] * [-sin theta, sin theta],   x = [x_1, x_2]

  (the halves swapped by one reversed reshape, no split and concatenate). ``fraction < 1`` rotates only the
  first ``int(head_dim * fraction)`` channels of each head and passes the rest through (GPT-NeoX's partial
  rotary); ``scaling`` rescales the frequencies (:func:`rope_inv_freq`).
  """
  head_dim = x.shape[-1]
  rot = head_dim if fraction == 1.0 else int(head_dim * fraction)
  if rot == 0:
    return x
  if rot % 2:
    raise ValueError(f"RoPE needs an even number of rotated channels; got {rot} of head_dim {head_dim}")
  cos, sin = rope_tables(positions, rot, base, scaling)
  xf = x.astype(jnp.float32)
  xr = xf if rot == head_dim else xf[..., :rot]
  swapped = xr.reshape(*xr.shape[:-1], 2, rot // 2)[..., ::-1, :].reshape(xr.shape)
  out = xr * cos + swapped * sin
  if rot < head_dim:
    out = jnp.concatenate([out, xf[..., rot:]], axis=-1)
  return out.astype(x.dtype)


def apply_2d(linear: nnx.Linear, x: jax.Array) -> jax.Array:
  """``linear(x)`` over the flattened leading axes: XLA:CPU differentiates a 2-D matmul ~1.5x faster than the
  same contraction over (batch, seq, features) (benchmarks/train_throughput.py)."""
  return linear(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


class RMSNorm(nnx.Module):
  """Root-mean-square norm over the last axis (Zhang & Sennrich 2019), parameter ``scale`` (ones):

      y = (x * rsqrt(mean(x^2) + eps)) * scale

  in float32, returned in ``dtype``; ``x`` and ``scale`` are first rounded to ``dtype``, as flax's ``nnx.RMSNorm``
  does, whose values (to rounding; it multiplies by ``rsqrt(...) * scale``) and parameter name and initialisation
  key it reproduces with fewer ops in the backward pass. Normalising before scaling (Hugging Face's LlamaRMSNorm
  order) keeps XLA:CPU from materialising the (batch, seq, d) product ``rsqrt(...) * scale``: the training step
  of benchmarks/train_throughput.py ran ~3 % faster."""

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.scale = nnx.Param(nnx.initializers.ones(rngs.params(), (dim,), jnp.float32))
    self.eps, self.dtype = eps, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype).astype(jnp.float32)
    scale = self.scale[...].astype(self.dtype).astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return ((x * inv_rms) * scale).astype(self.dtype)


def make_norm(kind: str, dim: int, eps: float, *, rngs: nnx.Rngs, dtype=jnp.float32,
              fast_variance: bool = True) -> nnx.Module:
  """:class:`RMSNorm` (which has no mean, so ``fast_variance`` does not apply) or flax's LayerNorm;
  ``fast_variance=False``: two-pass variance ``mean((x - mean x)^2)``, as torch's LayerNorm computes it."""
  if kind == "rmsnorm":
    return RMSNorm(dim, eps, rngs=rngs, dtype=dtype)
  if kind == "layernorm":
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs, use_fast_variance=fast_variance)
  raise ValueError(f"unknown norm {kind!r}; expected 'rmsnorm' or 'layernorm'")


MLP_ACTIVATIONS = ("swiglu", "gelu", "gelu_exact", "relu")


class MLP(nnx.Module):
  """Feed-forward block: SwiGLU ``W_o(silu(W_g x) * W_u x)`` (Shazeer 2020) or ``W_o act(W_u x)`` for
  gelu (tanh approximation, GPT-2's gelu_new) / gelu_exact (erf) / relu; ``use_bias`` adds biases to every
  projection."""

  def __init__(self, d_model: int, hidden: int, activation: str, *, init: str, rngs: nnx.Rngs, dtype=jnp.float32,
               use_bias: bool = False):
    if activation not in MLP_ACTIVATIONS:
      raise ValueError(f"unknown MLP activation {activation!r}; expected one of {MLP_ACTIVATIONS}")
    self.activation = activation
    lin = lambda i, o, axes: nnx.Linear(i, o, use_bias=use_bias, kernel_init=kernel_init(init, axes), dtype=dtype,
                                        rngs=rngs)
    self.up = lin(d_model, hidden, ("embed", "mlp"))
    self.gate = lin(d_model, hidden, ("embed", "mlp")) if activation == "swiglu" else None
    self.down = lin(hidden, d_model, ("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.activation == "swiglu":
      h = jax.nn.silu(apply_2d(self.gate, x)) * apply_2d(self.up, x)
    else:
      act = {"gelu": jax.nn.gelu, "relu": jax.nn.relu,
             "gelu_exact": lambda u: jax.nn.gelu(u, approximate=False)}[self.activation]
      h = act(apply_2d(self.up, x))
    return apply_2d(self.down, h)

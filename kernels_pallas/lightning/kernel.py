"""Lightning attention as one portable Pallas kernel (Qin et al. 2024, Lightning Attention-2), forward and
backward under ``jax.custom_vjp``.

    O = ((Q K^T) ⊙ M) V,   M_ij = lambda_h^(i-j) (i >= j)

Grid ``(batch, heads)``; each program owns one head's whole (n, d) q/k and (n, e) v and walks the blocks of
``block_size`` rows with ``lax.fori_loop``, carrying the d x e state in registers/VMEM (Lightning Attention-2's
"chunk loop"):

    forward :  O_t  = [(Q_t K_t^T) ⊙ D] V_t + diag(lambda^(a+1)) Q_t KV_t,   KV_{t+1} = lambda^B KV_t + (diag(lambda^(B-1-b)) K_t)^T V_t
    backward:  dQ_t = [(dO_t V_t^T) ⊙ D] K_t + diag(lambda^(a+1)) dO_t KV_t^T                   (forward loop)
               dK_t = [(dO_t V_t^T) ⊙ D]^T Q_t + diag(lambda^(B-1-b)) V_t G_t^T                (reverse loop)
               dV_t = [(Q_t K_t^T) ⊙ D]^T dO_t + diag(lambda^(B-1-b)) K_t G_t,
               G_{t-1} = lambda^B G_t + (diag(lambda^(a+1)) Q_t)^T dO_t,  G_{last} = 0

Decay factors are built in-kernel from the per-head log-decay ``s = -log lambda`` as ``exp(-s n)``, ``n >= 0``
only. Accumulation and state are float32. The sequence is zero-padded to a multiple of ``block_size`` (exact for
causal linear attention: padded keys come after every real query and padded queries are dropped). The residuals
are q, k, v only; the state is recomputed in the backward. The decay is a fixed schedule: its cotangent is zero.

Portability: only BlockSpecs over (batch, heads) with full (n, d) minor dims, ``fori_loop``, 2-D dots and iota,
so the same kernel lowers to Triton (GPU) and Mosaic (TPU) and runs in interpret mode on CPU. On GPU, head dims
and ``block_size`` should be powers of two >= 16 (Triton dot tiles); on TPU one head's q, k, v, o must fit in
VMEM (e.g. n = 16k, d = e = 128 in float32 is 32 MiB: use bf16 or a smaller n there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from attnlab.ops.lightning.common import check_inputs

_F32 = jnp.float32


def _dot(a, b, ca: int, cb: int):
  """2-D matmul contracting axis ``ca`` of a with axis ``cb`` of b, float32 accumulation."""
  return jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), preferred_element_type=_F32)


def _decays(s, block: int):
  """s: (1, 1) log-decay. Returns q-decay (B, 1) lambda^(a+1), k-decay (B, 1) lambda^(B-1-b), block decay
  (1, 1) lambda^B and the intra mask (B, B) lambda^(i-j) [i >= j]."""
  a = jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0).astype(_F32)
  i = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
  j = jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
  diff = jnp.maximum(i - j, 0).astype(_F32)
  intra = jnp.where(i >= j, jnp.exp(-s * diff), 0.0)
  return jnp.exp(-s * (a + 1.0)), jnp.exp(-s * (block - 1.0 - a)), jnp.exp(-s * float(block)), intra


def _rows(t, block: int):
  return pl.ds(pl.multiple_of(t * block, block), block)


def _fwd_kernel(s_ref, q_ref, k_ref, v_ref, o_ref, *, block: int, num_blocks: int):
  qdec, kdec, bdec, intra = _decays(s_ref[...].astype(_F32), block)

  def body(t, kv):
    rows = _rows(t, block)
    q, k, v = (r[rows, :].astype(_F32) for r in (q_ref, k_ref, v_ref))
    o = _dot(_dot(q, k, 1, 1) * intra, v, 1, 0) + _dot(q * qdec, kv, 1, 0)
    o_ref[rows, :] = o.astype(o_ref.dtype)
    return bdec * kv + _dot(k * kdec, v, 0, 0)

  jax.lax.fori_loop(0, num_blocks, body, jnp.zeros((q_ref.shape[-1], v_ref.shape[-1]), _F32))


def _bwd_kernel(s_ref, q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref, *, block: int, num_blocks: int):
  qdec, kdec, bdec, intra = _decays(s_ref[...].astype(_F32), block)
  d, e = q_ref.shape[-1], v_ref.shape[-1]

  def dq_body(t, kv):
    rows = _rows(t, block)
    k, v, do = (r[rows, :].astype(_F32) for r in (k_ref, v_ref, do_ref))
    dq = _dot(_dot(do, v, 1, 1) * intra, k, 1, 0) + qdec * _dot(do, kv, 1, 1)
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)
    return bdec * kv + _dot(k * kdec, v, 0, 0)

  def dkv_body(r, g):
    rows = _rows(num_blocks - 1 - r, block)
    q, k, v, do = (ref[rows, :].astype(_F32) for ref in (q_ref, k_ref, v_ref, do_ref))
    dk = _dot(_dot(do, v, 1, 1) * intra, q, 0, 0) + kdec * _dot(v, g, 1, 1)
    dv = _dot(_dot(q, k, 1, 1) * intra, do, 0, 0) + kdec * _dot(k, g, 1, 0)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    return bdec * g + _dot(q * qdec, do, 0, 0)

  jax.lax.fori_loop(0, num_blocks, dq_body, jnp.zeros((d, e), _F32))
  jax.lax.fori_loop(0, num_blocks, dkv_body, jnp.zeros((d, e), _F32))


def _specs(*arrays):
  """Per-(batch, head) BlockSpecs: the whole (n, dim) slab of (batch, heads, n, dim) arrays."""
  return [pl.BlockSpec((None, None) + x.shape[2:], lambda b, h: (b, h, 0, 0)) for x in arrays]


def _decay_spec():
  return pl.BlockSpec((None, 1, 1), lambda b, h: (h, 0, 0))


def _call(kernel, s, ins, outs, block: int, interpret: bool):
  b, h, n, _ = ins[0].shape
  kernel = functools.partial(kernel, block=block, num_blocks=n // block)
  return pl.pallas_call(kernel, grid=(b, h), in_specs=[_decay_spec()] + _specs(*ins), out_specs=_specs(*outs),
                        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outs], interpret=interpret,
                        name=kernel.func.__name__.strip("_"))(s, *ins)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lightning(q, k, v, s, block: int, interpret: bool):
  """(batch, heads, n, d|e) arrays with n a multiple of ``block``; s: (heads, 1, 1) float32."""
  return _call(_fwd_kernel, s, (q, k, v), (v,), block, interpret)[0]


def _lightning_fwd(q, k, v, s, block, interpret):
  return _lightning(q, k, v, s, block, interpret), (q, k, v, s)


def _lightning_bwd(block, interpret, res, do):
  q, k, v, s = res
  dq, dk, dv = _call(_bwd_kernel, s, (q, k, v, do), (q, k, v), block, interpret)
  return dq, dk, dv, jnp.zeros_like(s)


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def lightning_attention(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, *, block_size: int = 64,
                        scale: float = 1.0, interpret: bool | None = None) -> jax.Array:
  """Pallas lightning attention, differentiable in q, k, v.

  Args:
    q, k: (batch, seq, heads, d); v: (batch, seq, heads, e) (the layout of ``attnlab.attend``).
    log_decay: (heads,) ``s_h = -log lambda_h >= 0`` (treated as a constant).
    block_size: rows per block; seq need not be a multiple of it.
    scale: multiplies q.
    interpret: run the kernel in the Pallas interpreter; default: only on CPU.

  Returns:
    (batch, seq, heads, e) in v's dtype.
  """
  check_inputs(q, k, v, log_decay)
  if block_size <= 0:
    raise ValueError(f"block_size must be positive; got {block_size}")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  n, h = q.shape[1], q.shape[2]
  pad = (-n) % block_size

  def to_bhnd(x):
    return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))

  q = (q * scale).astype(q.dtype) if scale != 1.0 else q
  s = jnp.asarray(log_decay, _F32).reshape(h, 1, 1)
  o = _lightning(to_bhnd(q), to_bhnd(k), to_bhnd(v), s, block_size, interpret)
  return jnp.swapaxes(o[:, :, :n], 1, 2)

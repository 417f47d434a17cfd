"""Chunked (block) lightning attention: dense products inside a block, a carried d x e state between blocks.

For block t of size B covering positions [tB, tB + B), local indices a, b in [0, B), and the state
``KV_t = sum_{j < tB} lambda^(tB-1-j) k_j^T v_j`` (the recurrent state after token tB - 1):

    O_t      = [(Q_t K_t^T) ⊙ D] V_t  +  diag(lambda^(a+1)) Q_t KV_t           (intra + inter)
    KV_{t+1} = lambda^B KV_t  +  (diag(lambda^(B-1-b)) K_t)^T V_t

with ``D_ab = lambda^(a-b)`` (a >= b). Packed runs (segment_ids): intra products are masked to the same run, a
query reads KV_t only if it belongs to the run entering the block, and the carry is dropped when a run starts
inside the block (only keys of the block's last run enter KV_{t+1}). Only non-negative powers of lambda appear. The block contributions and the
intra products are computed for all blocks at once; only the tiny state recursion is a ``lax.scan`` over blocks
(the "chunk" decomposition of Lightning Attention-2 / fla's chunk_fwd_h + chunk_fwd_o). A last partial block of
size m < B uses the same formulas with B -> m. Time O(n B (d + e) + n d e), memory O(n (d + e) + (n/B) d e).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops.lightning.common import check_inputs, decay_pow, intra_decay


def _blocks(q, k, v, s, state, size, seg, seg_before):
  """Full blocks of ``size``: q, k (b, nb*size, h, d) float32 (q pre-scaled), v float32; state (b, h, d, e);
  seg: None or (b, nb*size) segment ids with seg_before (b,) the id of the token before the first block."""
  b, n, h, d = q.shape
  nb = n // size
  qb, kb, vb = (x.reshape(b, nb, size, h, x.shape[-1]) for x in (q, k, v))
  idx = jnp.arange(size)
  qdec = decay_pow(s, idx + 1)[:, :, None]  # (B, h, 1): lambda^(a+1)
  kdec = decay_pow(s, size - 1 - idx)[:, :, None]  # (B, h, 1): lambda^(B-1-b)
  scores = jnp.einsum("bnihd,bnjhd->bnhij", qb, kb) * intra_decay(s, size)[None, None]
  keep = jnp.ones((nb, b), jnp.float32)
  if seg is not None:
    segb = seg.reshape(b, nb, size)
    entering = jnp.concatenate([seg_before[:, None], segb[:, :-1, -1]], axis=1)  # run carried into each block
    last = segb[:, :, -1]  # run carried out of each block
    scores = scores * (segb[..., :, None] == segb[..., None, :])[:, :, None]
    qdec = qdec * (segb == entering[..., None])[..., None, None]  # (b, nb, B, 1, 1): query sees the state
    kdec = kdec * (segb == last[..., None])[..., None, None]  # key enters the outgoing state
    keep = (last == entering).T.astype(jnp.float32)  # (nb, b): 0 where a new run starts inside the block
  o = jnp.einsum("bnhij,bnjhe->bnihe", scores, vb)
  contrib = jnp.einsum("bnjhd,bnjhe->nbhde", kb * kdec, vb)
  block_decay = jnp.exp(-s * size)[None, :, None, None]

  def step(kv, xs):
    c, kp = xs
    return kp[:, None, None, None] * block_decay * kv + c, kv

  state, before = jax.lax.scan(step, state, (contrib, keep))  # before[t] = KV_t (state entering block t)
  o = o + jnp.einsum("bnihd,nbhde->bnihe", qb * qdec, before)
  return o.reshape(b, n, h, -1), state


def lightning_chunked(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, *, block_size: int = 64,
                      scale: float = 1.0, initial_state: jax.Array | None = None, return_state: bool = False,
                      segment_ids: jax.Array | None = None):
  """Chunked lightning attention; same contract as :func:`lightning_naive`, any sequence length.

  Args:
    q, k: (batch, seq, heads, d); v: (batch, seq, heads, e).
    log_decay: (heads,) ``s_h = -log lambda_h >= 0``.
    block_size: block length B (seq need not be a multiple of it).
    scale: multiplies q.
    initial_state: optional (batch, heads, d, e) state of the tokens before ``q[:, 0]`` (recurrent convention).
    return_state: also return the final (batch, heads, d, e) float32 state (prefill for decoding).
    segment_ids: optional (batch, seq) contiguous runs (packed documents); the state resets where the id changes.

  Returns:
    (batch, seq, heads, e) in v's dtype, or ``(out, state)`` when ``return_state``.
  """
  check_inputs(q, k, v, log_decay, initial_state, segment_ids)
  if block_size <= 0:
    raise ValueError(f"block_size must be positive; got {block_size}")
  b, n, h, d = q.shape
  e = v.shape[-1]
  s = jnp.asarray(log_decay, jnp.float32)
  q32, k32, v32 = q.astype(jnp.float32) * scale, k.astype(jnp.float32), v.astype(jnp.float32)
  state = jnp.zeros((b, h, d, e), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
  full = (n // block_size) * block_size
  outs = []
  seg = segment_ids
  if full:
    o, state = _blocks(q32[:, :full], k32[:, :full], v32[:, :full], s, state, block_size,
                       None if seg is None else seg[:, :full], None if seg is None else seg[:, 0])
    outs.append(o)
  if n > full:
    o, state = _blocks(q32[:, full:], k32[:, full:], v32[:, full:], s, state, n - full,
                       None if seg is None else seg[:, full:], None if seg is None else seg[:, max(full - 1, 0)])
    outs.append(o)
  out = (jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]).astype(v.dtype)
  return (out, state) if return_state else out

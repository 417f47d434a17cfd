"""Triton-style (GPU) flash kernels: one program per (batch, head, query block), a loop over key blocks.

Layout (batch, seq, heads, head_dim) as in ``jax.nn.dot_product_attention``. Forward: online row state in
registers (FlashAttention-2, Dao 2023), causal loops stop at the diagonal and sliding-window loops start at the
band's lower edge. Backward: a dq kernel (loop over key
blocks) and a dk/dv kernel (loop over query blocks, from the diagonal on), both recomputing the weights from the
residual ``r``; dk/dv are produced per query head and summed over each GQA group outside the kernel.
Runs with ``interpret=True`` on CPU; the same code lowers to Triton for NVIDIA GPUs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.flash import common
from kernels_pallas.flash.common import FlashStatic

def _params(st: FlashStatic):
  return plgpu.CompilerParams(num_warps=st.blocks.num_warps, num_stages=st.blocks.num_stages)


def _split(refs, st: FlashStatic, n_out: int, with_sinks: bool = False):
  """Unpacks (required..., [q_seg, kv_seg], [count], [sinks], outputs...) kernel refs."""
  refs = list(refs)
  outs = refs[len(refs) - n_out:]
  ins = refs[:len(refs) - n_out]
  seg = (ins.pop(0), ins.pop(0)) if st.has_segments else (None, None)
  count = ins.pop(0) if st.score.needs_count else None
  sinks = ins.pop(0) if with_sinks and st.has_sinks else None
  assert not ins
  return seg, count, sinks, outs


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, st: FlashStatic):
  (q_seg_ref, kv_seg_ref), count_ref, sink_ref, (o_ref, r_ref) = _split(refs, st, 2, with_sinks=True)
  bq, bk = st.blocks.block_q, st.blocks.block_kv
  q_start = pl.program_id(2) * bq
  q = q_ref[...]
  n = None if count_ref is None else count_ref[...]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]
  sink = None if sink_ref is None else sink_ref[...]
  carry = common.init_state(st, sink, n, bq, q.shape[-1])

  def body(j, carry):
    k_start = j * bk
    k = k_ref[pl.ds(k_start, bk), :]
    v = v_ref[pl.ds(k_start, bk), :]
    k_seg = None if kv_seg_ref is None else kv_seg_ref[:, pl.ds(k_start, bk)]
    mask = common.block_mask(st, q_start, k_start, bq, bk, q_seg, k_seg)
    return common.fwd_block(st, common.logits(st, q, k), mask, n, v, *carry)

  lo = common.kv_block_start(st, q_start, bk, st.kv_len // bk)  # tiles outside the causal/window band: skipped
  hi = common.kv_block_range(st, q_start, bq, bk, st.kv_len // bk)
  m, l, acc = jax.lax.fori_loop(lo, hi, body, carry)
  o, r = common.finalize(st, m, l, acc, n)
  o_ref[...] = o.astype(o_ref.dtype)
  r_ref[...] = r


def _row_inputs(st: FlashStatic, q_seg, kv_seg, count, sinks, bq):
  """Arrays and BlockSpecs of the optional per-row inputs (segment ids, visible counts, sinks)."""
  args, specs = [], []
  if st.has_segments:
    args += [q_seg, kv_seg]
    specs += [pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)),
              pl.BlockSpec((None, 1, st.kv_len), lambda b, h, i: (b, 0, 0))]
  if st.score.needs_count:
    args.append(count)
    specs.append(pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)))
  if sinks is not None:
    args.append(sinks)
    specs.append(pl.BlockSpec((None, 1, 1), lambda b, h, i: (h, 0, 0)))
  return args, specs


def forward(st: FlashStatic, q, k, v, q_seg, kv_seg, count, sinks):
  """o (B, Q, H, D) and r (B, H, Q, 1), float32 residual."""
  batch, q_len, heads, head_dim = q.shape
  bq, g = st.blocks.block_q, st.groups
  extra, extra_specs = _row_inputs(st, q_seg, kv_seg, count, sinks, bq)
  kv_spec = pl.BlockSpec((None, st.kv_len, None, head_dim), lambda b, h, i: (b, 0, common.kv_head(h, g), 0))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, st=st),
      grid=(batch, heads, q_len // bq),
      in_specs=[pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0)), kv_spec, kv_spec,
                *extra_specs],
      out_specs=[pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0)),
                 pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len, 1), jnp.float32)],
      compiler_params=_params(st), interpret=st.interpret, name="flash_fwd_gpu",
  )(q, k, v, *extra)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, r_ref, delta_ref, *refs, st: FlashStatic):
  (q_seg_ref, kv_seg_ref), count_ref, _, (dq_ref,) = _split(refs, st, 1)
  bq, bk = st.blocks.block_q_bwd, st.blocks.block_kv_bwd
  q_start = pl.program_id(2) * bq
  q, do, r, delta = q_ref[...], do_ref[...], r_ref[...], delta_ref[...]
  n = None if count_ref is None else count_ref[...]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]

  def body(j, dq):
    k_start = j * bk
    k = k_ref[pl.ds(k_start, bk), :]
    v = v_ref[pl.ds(k_start, bk), :]
    k_seg = None if kv_seg_ref is None else kv_seg_ref[:, pl.ds(k_start, bk)]
    mask = common.block_mask(st, q_start, k_start, bq, bk, q_seg, k_seg)
    _, ds = common.bwd_block(st, common.logits(st, q, k), mask, r, n, common.dot(do, v, common.NT), delta)
    return dq + common.dot(ds.astype(k.dtype), k)

  lo = common.kv_block_start(st, q_start, bk, st.kv_len // bk)
  hi = common.kv_block_range(st, q_start, bq, bk, st.kv_len // bk)
  dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, r_ref, delta_ref, *refs, st: FlashStatic):
  (q_seg_ref, kv_seg_ref), count_ref, _, (dk_ref, dv_ref) = _split(refs, st, 2)
  bq, bk = st.blocks.block_q_bwd, st.blocks.block_kv_bwd
  k_start = pl.program_id(2) * bk
  k, v = k_ref[...], v_ref[...]
  k_seg = None if kv_seg_ref is None else kv_seg_ref[...]

  def body(i, carry):
    dk, dv = carry
    q_start = i * bq
    rows = pl.ds(q_start, bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    n = None if count_ref is None else count_ref[rows, :]
    q_seg = None if q_seg_ref is None else q_seg_ref[rows, :]
    mask = common.block_mask(st, q_start, k_start, bq, bk, q_seg, k_seg)
    p, ds = common.bwd_block(st, common.logits(st, q, k), mask, r_ref[rows, :], n, common.dot(do, v, common.NT),
                             delta_ref[rows, :])
    dv = dv + common.dot(p.astype(do.dtype), do, common.TN)
    dk = dk + common.dot(ds.astype(q.dtype), q, common.TN)
    return dk, dv

  lo = common.q_block_start(st, k_start, bq, st.q_len // bq)
  hi = common.q_block_end(st, k_start, bq, bk, st.q_len // bq)
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(lo, hi, body, (zeros, zeros))
  dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(st: FlashStatic, q, k, v, q_seg, kv_seg, count, o, r, do, delta):
  """(dq, dk, dv); dk/dv per query head, (B, K, H, D) float32, summed over GQA groups by the caller."""
  del o
  batch, q_len, heads, head_dim = q.shape
  bq, bk, g = st.blocks.block_q_bwd, st.blocks.block_kv_bwd, st.groups
  kv_len = st.kv_len

  extra, extra_specs = _row_inputs(st, q_seg, kv_seg, count, None, bq)
  q_spec = pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0))
  kv_full = pl.BlockSpec((None, kv_len, None, head_dim), lambda b, h, i: (b, 0, common.kv_head(h, g), 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st),
      grid=(batch, heads, q_len // bq),
      in_specs=[q_spec, kv_full, kv_full, q_spec, row_spec, row_spec, *extra_specs],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(st), interpret=st.interpret, name="flash_dq_gpu",
  )(q, k, v, do, r, delta, *extra)

  # dk/dv: every program sees all query rows (full q/do/r/delta/q_seg/count) and one key block.
  extra, extra_specs = [], []
  if st.has_segments:
    extra += [q_seg, kv_seg]
    extra_specs += [pl.BlockSpec((None, q_len, 1), lambda b, h, j: (b, 0, 0)),
                    pl.BlockSpec((None, 1, bk), lambda b, h, j: (b, 0, j))]
  if st.score.needs_count:
    extra.append(count)
    extra_specs.append(pl.BlockSpec((None, q_len, 1), lambda b, h, j: (b, 0, 0)))
  q_full = pl.BlockSpec((None, q_len, None, head_dim), lambda b, h, j: (b, 0, h, 0))
  kv_spec = pl.BlockSpec((None, bk, None, head_dim), lambda b, h, j: (b, j, common.kv_head(h, g), 0))
  row_full = pl.BlockSpec((None, None, q_len, 1), lambda b, h, j: (b, h, 0, 0))
  dkv_spec = pl.BlockSpec((None, bk, None, head_dim), lambda b, h, j: (b, j, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st),
      grid=(batch, heads, kv_len // bk),
      in_specs=[q_full, kv_spec, kv_spec, q_full, row_full, row_full, *extra_specs],
      out_specs=[dkv_spec, dkv_spec],
      out_shape=[jax.ShapeDtypeStruct((batch, kv_len, heads, head_dim), jnp.float32)] * 2,
      compiler_params=_params(st), interpret=st.interpret, name="flash_dkv_gpu",
  )(q, k, v, do, r, delta, *extra)
  return dq, dk, dv

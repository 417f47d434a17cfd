"""TPU-style (Mosaic) flash kernels: the key blocks are the last ("arbitrary") grid axis, row state in VMEM scratch.

Same block math as the GPU kernel (:mod:`kernels_pallas.flash.common`); only the schedule differs. Layout inside the
kernel is (batch, heads, seq, head_dim) so that tiles are (block, head_dim) in the last two dims (TPU tiling rule:
multiples of (8, 128) or the full dimension); per-row vectors are (block, 1) columns, key-side vectors (1, block)
rows. Causal tiles above the diagonal and sliding-window tiles below the band are skipped with ``pl.when`` and
their DMA is avoided by clamping the block index maps into the band. Runs on CPU under ``interpret=pltpu.InterpretParams()`` (the TPU simulator) or plain ``interpret=True``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.flash import common
from kernels_pallas.flash.common import FlashStatic

SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _interpret(st: FlashStatic):
  """TPU kernels run under the TPU simulator when interpreted (it checks DMAs, VMEM and races)."""
  return pltpu.InterpretParams() if st.interpret else False


def _split(refs, st: FlashStatic, n_out: int, n_scratch: int, with_sinks: bool = False):
  refs = list(refs)
  scratch = refs[len(refs) - n_scratch:]
  outs = refs[len(refs) - n_scratch - n_out:len(refs) - n_scratch]
  ins = refs[:len(refs) - n_scratch - n_out]
  seg = (ins.pop(0), ins.pop(0)) if st.has_segments else (None, None)
  count = ins.pop(0) if st.score.needs_count else None
  sinks = ins.pop(0) if with_sinks and st.has_sinks else None
  assert not ins
  return seg, count, sinks, outs, scratch


def _optional_inputs(st, q_seg, kv_seg, count, sinks, q_block, k_block, bq, bk):
  """Segment ids / counts / sinks with BlockSpecs; q_block(b,h,x,y) and k_block(...) give the block indices."""
  args, specs = [], []
  if st.has_segments:
    args += [q_seg, kv_seg]
    specs += [pl.BlockSpec((None, bq, 1), lambda b, h, x, y: (b, q_block(b, h, x, y), 0)),
              pl.BlockSpec((None, 1, bk), lambda b, h, x, y: (b, 0, k_block(b, h, x, y)))]
  if st.score.needs_count:
    args.append(count)
    specs.append(pl.BlockSpec((None, bq, 1), lambda b, h, x, y: (b, q_block(b, h, x, y), 0)))
  if sinks is not None:
    args.append(sinks)
    specs.append(pl.BlockSpec((None, 1, 1), lambda b, h, x, y: (h, 0, 0)))
  return args, specs


def _last_kv_block(st, q_block_index, bq, bk):
  hi = common.kv_block_range(st, q_block_index * bq, bq, bk, st.kv_len // bk)
  return jnp.maximum(hi - 1, 0)


def _kv_visible(st, i, j, bq, bk):
  """Whether key block j can be visible to query block i (inside the causal/window band)."""
  nk = st.kv_len // bk
  lo, hi = common.kv_block_start(st, i * bq, bk, nk), common.kv_block_range(st, i * bq, bq, bk, nk)
  return jnp.logical_and(j >= lo, j < hi)


def _kv_block(st, i, j, bq, bk):
  """The key block fetched at step j of query block i: j clamped into the band (no DMA for skipped tiles)."""
  lo = common.kv_block_start(st, i * bq, bk, st.kv_len // bk)
  return jnp.minimum(jnp.maximum(j, lo), _last_kv_block(st, i, bq, bk))


def _first_q_block(st, k_block_index, bq, bk):
  return jnp.minimum(common.q_block_start(st, k_block_index * bk, bq, st.q_len // bq), st.q_len // bq - 1)


def _q_visible(st, j, i, bq, bk):
  nq = st.q_len // bq
  lo, hi = common.q_block_start(st, j * bk, bq, nq), common.q_block_end(st, j * bk, bq, bk, nq)
  return jnp.logical_and(i >= lo, i < hi)


def _q_block(st, j, i, bq, bk):
  hi = common.q_block_end(st, j * bk, bq, bk, st.q_len // bq)
  return jnp.minimum(jnp.maximum(i, _first_q_block(st, j, bq, bk)), jnp.maximum(hi - 1, 0))


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, st: FlashStatic):
  (q_seg_ref, kv_seg_ref), count_ref, sink_ref, (o_ref, r_ref), (m_sc, l_sc, acc_sc) = _split(refs, st, 2, 3, with_sinks=True)
  bq, bk = st.blocks.block_q, st.blocks.block_kv
  i, j = pl.program_id(2), pl.program_id(3)
  n = None if count_ref is None else count_ref[...]

  @pl.when(j == 0)
  def _init():
    m, l, acc = common.init_state(st, None if sink_ref is None else sink_ref[...], n, bq, acc_sc.shape[-1])
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

  @pl.when(_kv_visible(st, i, j, bq, bk))
  def _step():
    q_seg = None if q_seg_ref is None else q_seg_ref[...]
    k_seg = None if kv_seg_ref is None else kv_seg_ref[...]
    mask = common.block_mask(st, i * bq, j * bk, bq, bk, q_seg, k_seg)
    s = common.logits(st, q_ref[...], k_ref[...])
    m, l, acc = common.fwd_block(st, s, mask, n, v_ref[...], m_sc[...], l_sc[...], acc_sc[...])
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    o, r = common.finalize(st, m_sc[...], l_sc[...], acc_sc[...], n)
    o_ref[...] = o.astype(o_ref.dtype)
    r_ref[...] = r


def forward(st: FlashStatic, q, k, v, q_seg, kv_seg, count, sinks):
  """o (B, Q, H, D) and r (B, H, Q, 1); the kernel itself works on (B, H, S, D)."""
  batch, q_len, heads, head_dim = q.shape
  bq, bk, g = st.blocks.block_q, st.blocks.block_kv, st.groups
  qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  kv_index = lambda b, h, i, j: (b, common.kv_head(h, g), _kv_block(st, i, j, bq, bk), 0)
  extra, extra_specs = _optional_inputs(st, q_seg, kv_seg, count, sinks, lambda b, h, i, j: i,
                                        lambda b, h, i, j: _kv_block(st, i, j, bq, bk), bq, bk)
  o, r = pl.pallas_call(
      functools.partial(_fwd_kernel, st=st),
      grid=(batch, heads, q_len // bq, st.kv_len // bk),
      in_specs=[pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j: (b, h, i, 0)),
                pl.BlockSpec((None, None, bk, head_dim), kv_index),
                pl.BlockSpec((None, None, bk, head_dim), kv_index), *extra_specs],
      out_specs=[pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j: (b, h, i, 0)),
                 pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0))],
      out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len, 1), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, head_dim), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=SEMANTICS),
      interpret=_interpret(st), name="flash_fwd_tpu",
  )(qt, kt, vt, *extra)
  return o.transpose(0, 2, 1, 3), r


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, r_ref, delta_ref, *refs, st: FlashStatic):
  (q_seg_ref, kv_seg_ref), count_ref, _, (dq_ref,), (dq_sc,) = _split(refs, st, 1, 1)
  bq, bk = st.blocks.block_q_bwd, st.blocks.block_kv_bwd
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(_kv_visible(st, i, j, bq, bk))
  def _step():
    q_seg = None if q_seg_ref is None else q_seg_ref[...]
    k_seg = None if kv_seg_ref is None else kv_seg_ref[...]
    n = None if count_ref is None else count_ref[...]
    mask = common.block_mask(st, i * bq, j * bk, bq, bk, q_seg, k_seg)
    k = k_ref[...]
    dp = common.dot(do_ref[...], v_ref[...], common.NT)
    _, ds = common.bwd_block(st, common.logits(st, q_ref[...], k), mask, r_ref[...], n, dp, delta_ref[...])
    dq_sc[...] += common.dot(ds.astype(k.dtype), k)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, r_ref, delta_ref, *refs, st: FlashStatic):
  (q_seg_ref, kv_seg_ref), count_ref, _, (dk_ref, dv_ref), (dk_sc, dv_sc) = _split(refs, st, 2, 2)
  bq, bk = st.blocks.block_q_bwd, st.blocks.block_kv_bwd
  j, i = pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(_q_visible(st, j, i, bq, bk))
  def _step():
    q_seg = None if q_seg_ref is None else q_seg_ref[...]
    k_seg = None if kv_seg_ref is None else kv_seg_ref[...]
    n = None if count_ref is None else count_ref[...]
    mask = common.block_mask(st, i * bq, j * bk, bq, bk, q_seg, k_seg)
    q, do = q_ref[...], do_ref[...]
    dp = common.dot(do, v_ref[...], common.NT)
    p, ds = common.bwd_block(st, common.logits(st, q, k_ref[...]), mask, r_ref[...], n, dp, delta_ref[...])
    dv_sc[...] += common.dot(p.astype(do.dtype), do, common.TN)
    dk_sc[...] += common.dot(ds.astype(q.dtype), q, common.TN)

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(st: FlashStatic, q, k, v, q_seg, kv_seg, count, o, r, do, delta):
  """(dq, dk, dv); dk/dv per query head (B, K, H, D) float32, summed over GQA groups by the caller."""
  del o
  batch, q_len, heads, head_dim = q.shape
  bq, bk, g = st.blocks.block_q_bwd, st.blocks.block_kv_bwd, st.groups
  kv_len = st.kv_len
  qt, kt, vt, dot_ = (x.transpose(0, 2, 1, 3) for x in (q, k, v, do))
  params = pltpu.CompilerParams(dimension_semantics=SEMANTICS)

  # dq: grid (b, h, q block i, kv block j).
  kv_block = lambda i, j: _kv_block(st, i, j, bq, bk)
  q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, i, j: (b, common.kv_head(h, g), kv_block(i, j), 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0))
  extra, extra_specs = _optional_inputs(st, q_seg, kv_seg, count, None, lambda b, h, i, j: i,
                                        lambda b, h, i, j: kv_block(i, j), bq, bk)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st),
      grid=(batch, heads, q_len // bq, kv_len // bk),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *extra_specs],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
      compiler_params=params, interpret=_interpret(st), name="flash_dq_tpu",
  )(qt, kt, vt, dot_, r, delta, *extra)

  # dk/dv: grid (b, h, kv block j, q block i); query blocks above the diagonal are skipped.
  q_block = lambda j, i: _q_block(st, j, i, bq, bk)
  q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, j, i: (b, h, q_block(j, i), 0))
  kv_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, j, i: (b, common.kv_head(h, g), j, 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, j, i: (b, h, q_block(j, i), 0))
  dkv_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, j, i: (b, h, j, 0))
  extra, extra_specs = _optional_inputs(st, q_seg, kv_seg, count, None,
                                        lambda b, h, j, i: q_block(j, i), lambda b, h, j, i: j, bq, bk)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st),
      grid=(batch, heads, kv_len // bk, q_len // bq),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *extra_specs],
      out_specs=[dkv_spec, dkv_spec],
      out_shape=[jax.ShapeDtypeStruct((batch, heads, kv_len, head_dim), jnp.float32)] * 2,
      scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32)] * 2,
      compiler_params=params, interpret=_interpret(st), name="flash_dkv_tpu",
  )(qt, kt, vt, dot_, r, delta, *extra)
  return dq.transpose(0, 2, 1, 3), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)

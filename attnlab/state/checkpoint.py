"""Orbax checkpoints of the train state + data-iterator position, verified on restore, with fallback past a broken
latest step.

Layout: ``workdir/checkpoints/<step>/{state, data, meta}``. ``state`` is the train-state pytree (model params,
non-param NNX variables incl. RNG streams, optimizer state, step); ``data`` the iterator state (JSON); ``meta``
the step and loss (JSON). Saves are asynchronous: the arrays are first copied on device, so the buffers the next
(donating) train step overwrites are never the ones being written.

Integrity: next to every step, ``workdir/checksums/<step>.json`` records the shape, dtype and a 64-bit checksum of
each array (position-weighted sums of the array's bits, computed on device by one jitted reduction: independent of
the sharding and the number of processes, and any single flipped bit changes it). It is written (atomically, by
process 0) before orbax starts the save, so a step orbax lists as complete always has its record.

On restore:

* a checkpoint whose recorded shapes/dtypes differ from the state being restored is a *configuration* error
  (:class:`CheckpointMismatchError`, naming the arrays that differ); nothing is moved;
* a step that fails to read, whose checksum differs (naming the array) or that holds non-finite values is moved
  to ``workdir/corrupt_checkpoints/<step>`` (``<step>.1``, ``<step>.2``... when an earlier copy of that step is
  already there: a quarantined copy is never overwritten) with a warning, and the previous step is tried;
* when steps exist but none restores: :class:`NoRestorableCheckpointError` (never a silent start from step 0).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
CHECKSUMS = "checksums"


class CheckpointMismatchError(ValueError):
  """The checkpoint holds a state of another configuration (array shapes or dtypes differ)."""


class NoRestorableCheckpointError(RuntimeError):
  """The workdir holds checkpoints, but none of them restores."""


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_savable(tree):
  """Typed PRNG keys -> their raw uint32 data (orbax stores plain arrays)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _from_savable(tree, like):
  return jax.tree.map(lambda x, l: jax.random.wrap_key_data(x, impl=jax.random.key_impl(l)) if _is_key(l) else x,
                      tree, like)


def _bits(x):
  """The array's raw bits as a flat uint32 vector (64-bit types as two words per element)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32).reshape(-1)
  size = x.dtype.itemsize
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def _checksum(x):
  """Two position-weighted sums (mod 2^32) of the bits: odd weights, so any single-bit change shows."""
  b = _bits(x)
  i = jnp.arange(b.shape[0], dtype=jnp.uint32)
  w1 = (i * jnp.uint32(2654435761)) | jnp.uint32(1)
  w2 = ((i ^ jnp.uint32(0x9E3779B9)) * jnp.uint32(40503)) | jnp.uint32(1)
  mixed = b ^ (b >> 16) ^ (b << 7)
  return jnp.stack([jnp.sum(b * w1, dtype=jnp.uint32), jnp.sum(mixed * w2, dtype=jnp.uint32)])


_checksums_jit = jax.jit(lambda leaves: [_checksum(x) for x in leaves])


def array_records(tree) -> dict[str, dict]:
  """{path: {"shape", "dtype", "checksum"}} of every array leaf of a (savable) state."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = jax.device_get(_checksums_jit([x for _, x in flat]))
  return {jax.tree_util.keystr(p): {"shape": list(np.shape(x)), "dtype": str(x.dtype),
                                    "checksum": "%08x%08x" % tuple(int(v) for v in s)}
          for (p, x), s in zip(flat, sums)}


def _layout(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): (list(x.shape), str(x.dtype)) for p, x in flat}


def _all_finite(tree) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return bool(jax.device_get(jax.jit(lambda ls: jnp.all(jnp.stack([jnp.all(jnp.isfinite(l)) for l in ls])))(leaves))) \
      if leaves else True


def unique_destination(directory: str, name: str) -> str:
  """``directory/name``, or ``name.1``, ``name.2``... : the first that does not exist yet."""
  dest, n = os.path.join(directory, name), 0
  while os.path.exists(dest):
    n += 1
    dest = os.path.join(directory, f"{name}.{n}")
  return dest


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` (save every N / at the end, keep K, async) with per-array
  checksums verified on restore."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
      raise ValueError(f"TrainConfig.keep_checkpoints must be a positive int; got {keep!r}")
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.checksum_directory = os.path.abspath(os.path.join(workdir, CHECKSUMS))
    self.corrupt_directory = os.path.abspath(os.path.join(workdir, "corrupt_checkpoints"))
    self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save)
    self._manager = self._make_manager()

  def _make_manager(self):
    return ocp.CheckpointManager(self.directory, options=self._options, item_names=("state", "data", "meta"))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def _record_path(self, step: int) -> str:
    return os.path.join(self.checksum_directory, f"{step}.json")

  def save(self, step: int, state, data_state: dict, meta: dict) -> None:
    state = jax.tree.map(jnp.copy, _to_savable(state))
    records = array_records(state)
    if jax.process_index() == 0:
      os.makedirs(self.checksum_directory, exist_ok=True)
      path = self._record_path(step)
      with open(path + ".tmp", "w") as f:
        json.dump({"step": step, "arrays": records}, f)
      os.replace(path + ".tmp", path)
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(data_state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

  def _read_record(self, step: int) -> dict | None:
    path = self._record_path(step)
    if not os.path.exists(path):
      return None  # a checkpoint of an older attnlab: restored unverified
    with open(path) as f:
      record = json.load(f)  # an unreadable record: the caller treats the step as corrupt
    if not isinstance(record, dict) or not isinstance(record.get("arrays"), dict):
      raise ValueError(f"{path} is not a checksum record")
    return record["arrays"]

  def _check_layout(self, step: int, records: dict, abstract) -> None:
    want = _layout(abstract)
    have = {k: (v["shape"], v["dtype"]) for k, v in records.items()}
    if want == have:
      return
    diffs = [f"{k}: checkpoint {have[k][0]} {have[k][1]} vs. configured {want[k][0]} {want[k][1]}"
             for k in sorted(set(want) & set(have), key=lambda k: (not k.startswith("['params']"), k))
             if want[k] != have[k]]
    diffs += [f"{k}: only in the checkpoint" for k in sorted(set(have) - set(want))]
    diffs += [f"{k}: not in the checkpoint" for k in sorted(set(want) - set(have))]
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    raise CheckpointMismatchError(
        f"the checkpoint at step {step} in {self.directory} holds a model of another configuration: "
        f"{'; '.join(diffs[:3])}{more}; nothing was moved (use the run's own configuration, or a new workdir)")

  def restore_latest(self, like_state):
    """(step, state, data_state, meta) of the newest restorable checkpoint, or None when there is none. Raises
    :class:`CheckpointMismatchError` (nothing moved) when a checkpoint is of another configuration and
    :class:`NoRestorableCheckpointError` when steps exist but none restores."""
    self._manager.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_savable(like_state))
    steps = self.all_steps()
    for step in reversed(steps):
      try:
        records = self._read_record(step)
      except (OSError, ValueError) as e:
        self._quarantine(step, f"is corrupt: its checksum record is unreadable ({type(e).__name__}: {str(e)[:200]})")
        continue
      if records is not None:
        self._check_layout(step, records, abstract)  # a configuration error: raised, nothing moved
      try:
        out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  data=ocp.args.JsonRestore(),
                                                                  meta=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 (any failure to read a step with the right layout means it is unusable)
        self._quarantine(step, f"is unreadable ({type(e).__name__}: {str(e)[:200]})")
        continue
      if records is not None:
        got = array_records(out["state"])
        bad = [k for k in records if got.get(k, {}).get("checksum") != records[k]["checksum"]]
        if bad:
          self._quarantine(step, f"is corrupt: array {bad[0]} does not match its recorded checksum"
                           + (f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else ""))
          continue
      if not _all_finite(out["state"]):
        self._quarantine(step, "holds non-finite (NaN/inf) values")
        continue
      return step, _from_savable(out["state"], like_state), dict(out["data"]), dict(out["meta"])
    if steps:
      raise NoRestorableCheckpointError(
          f"none of the checkpoints of {os.path.dirname(self.directory)!r} (steps {steps}) restores; they were moved "
          f"to {self.corrupt_directory}; start over with --force or use a new workdir")
    return None

  def restore_step(self, step: int, like_state=None):
    """(state, data_state, meta) of checkpoint ``step``, restored into ``like_state``'s tree, or as saved when
    ``like_state`` is None (typed PRNG keys then come back as their raw uint32 data). Raises if the step is
    unreadable (nothing is quarantined)."""
    self._manager.wait_until_finished()
    target = None if like_state is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_savable(like_state))
    out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                              data=ocp.args.JsonRestore(),
                                                              meta=ocp.args.JsonRestore()))
    state = out["state"] if like_state is None else _from_savable(out["state"], like_state)
    return state, dict(out["data"]), dict(out["meta"])

  def _quarantine(self, step: int, why: str) -> None:
    dest = unique_destination(self.corrupt_directory, str(step))
    if jax.process_index() == 0:
      os.makedirs(self.corrupt_directory, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), dest)
      record = self._record_path(step)
      if os.path.exists(record):
        shutil.move(record, os.path.join(dest, "attnlab_checksums.json"))
    msg = f"checkpoint at step {step} {why}; moved it to {dest} and falling back to the previous checkpoint"
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    log.warning(msg)
    self._manager.close()
    self._manager = self._make_manager()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

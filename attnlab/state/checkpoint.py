"""Orbax checkpoints of the train state + data-iterator position, with fallback past a broken latest step.

Layout: ``workdir/checkpoints/<step>/{state, data, meta}``. ``state`` is the train-state pytree (model params,
non-param NNX variables incl. RNG streams, optimizer state, step); ``data`` the iterator state (JSON); ``meta``
the step and loss (JSON). Saves are asynchronous: the arrays are first copied on device, so the buffers the next
(donating) train step overwrites are never the ones being written. A step that fails to restore (partial write,
corrupted files) is moved to ``workdir/corrupt_checkpoints/`` with a warning and the previous step is used.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_savable(tree):
  """Typed PRNG keys -> their raw uint32 data (orbax stores plain arrays)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _from_savable(tree, like):
  return jax.tree.map(lambda x, l: jax.random.wrap_key_data(x, impl=jax.random.key_impl(l)) if _is_key(l) else x,
                      tree, like)


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` (save every N / at the end, keep K, async)."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.corrupt_directory = os.path.abspath(os.path.join(workdir, "corrupt_checkpoints"))
    self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save)
    self._manager = self._make_manager()

  def _make_manager(self):
    return ocp.CheckpointManager(self.directory, options=self._options, item_names=("state", "data", "meta"))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict, meta: dict) -> None:
    state = jax.tree.map(jnp.copy, _to_savable(state))
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(data_state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

  def restore_latest(self, like_state):
    """(step, state, data_state, meta) of the newest restorable checkpoint, or None when there is none."""
    self._manager.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_savable(like_state))
    for step in reversed(self.all_steps()):
      try:
        out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  data=ocp.args.JsonRestore(),
                                                                  meta=ocp.args.JsonRestore()))
        return step, _from_savable(out["state"], like_state), dict(out["data"]), dict(out["meta"])
      except Exception as e:  # noqa: BLE001 (any failure to read a step means it is unusable)
        self._quarantine(step, e)
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

  def _quarantine(self, step: int, error: Exception) -> None:
    os.makedirs(self.corrupt_directory, exist_ok=True)
    dest = os.path.join(self.corrupt_directory, str(step))
    shutil.rmtree(dest, ignore_errors=True)
    shutil.move(os.path.join(self.directory, str(step)), dest)
    msg = (f"checkpoint at step {step} is unreadable ({type(error).__name__}: {str(error)[:200]}); moved it to "
           f"{dest} and falling back to the previous checkpoint")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    log.warning(msg)
    self._manager.close()
    self._manager = self._make_manager()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

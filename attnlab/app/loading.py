"""A workdir's model in Python (``attnlab.app.load``), and restoring a checkpoint into a changed configuration.

``load(workdir, step=None) -> (model, config)``: the model of any workdir (trained by ``attnlab train`` or written
by ``attnlab import``) at its newest (or the given) checkpoint, in eval mode, with its ``ExperimentConfig``.

``adapt_checkpoint``: continued training under a configuration that adds parameters (``AttentionConfig.sink_logit
= True``, an output gate, ...) to a workdir's model. The newest checkpoint is restored by path: every array the
new train state has at the same path with the same shape is restored, every new one is initialised as ``attnlab
train`` initialises it (new parameters from ``TrainConfig.seed``, their optimizer moments at zero); the result
replaces that checkpoint, whose original moves to ``workdir/replaced_checkpoints/<step>``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.app.workdir import open_workdir
from attnlab.state import Checkpointer, build_state, restore_state
from attnlab.state.checkpoint import CHECKSUMS
from attnlab.train import ExperimentConfig

REPLACED = "replaced_checkpoints"


def load(workdir: str, step: int | None = None, *, gin_files: Sequence[str] = (),
         bindings: Sequence[str] = ()) -> tuple[nnx.Module, ExperimentConfig]:
  """(model in eval mode, ``ExperimentConfig``) of ``workdir`` at its newest readable checkpoint, or at ``step``.
  ``cfg.model`` is the ``ModelConfig``; ``attnlab.data.make_tokenizer(cfg.data.tokenizer)`` its tokenizer."""
  cfg = open_workdir(workdir, gin_files, bindings)
  if step is None:
    _, eval_graphdef, state = restore_state(cfg, workdir)
  else:
    _, eval_graphdef, like = build_state(cfg)
    ckpt = Checkpointer(workdir)
    try:
      if step not in ckpt.all_steps():
        raise ValueError(f"no checkpoint at step {step} in {workdir!r} (steps: {ckpt.all_steps()})")
      state, _, _ = ckpt.restore_step(step, like)
    finally:
      ckpt.close()
  return nnx.merge(eval_graphdef, state["params"], state["rest"]), cfg


def _is_key(x) -> bool:
  return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _flat(tree) -> dict:
  return {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _saved_form(x):
  """(shape, dtype) of a leaf as orbax stores it (typed PRNG keys as their raw data)."""
  if _is_key(x):
    x = jax.eval_shape(jax.random.key_data, x)
  return tuple(x.shape), jnp.dtype(x.dtype)


def adapt_checkpoint(cfg: ExperimentConfig, workdir: str) -> str | None:
  """Makes ``workdir``'s newest checkpoint restorable into ``cfg``'s train state when ``cfg`` adds arrays (see
  the module docstring); returns what it did, or None when there was nothing to adapt (no checkpoint, an
  unreadable one, which training's own restore handles, or one that already fits). An array present in both
  with a different shape or dtype is a ValueError: nothing is silently re-initialised."""
  ckpt = Checkpointer(workdir)
  try:
    steps = ckpt.all_steps()
    if not steps:
      return None
    step = steps[-1]
    try:
      saved, data_state, meta = ckpt.restore_step(step)
    except Exception:  # noqa: BLE001 (an unreadable step is training's restore's to quarantine)
      return None
  finally:
    ckpt.close()
  old = _flat(saved)
  want = _flat(jax.eval_shape(lambda: build_state(cfg)[2]))
  if set(old) == set(want) and all(_saved_form(old[k]) == _saved_form(w) for k, w in want.items()):
    return None
  for k in sorted(set(old) & set(want)):
    if _saved_form(old[k]) != _saved_form(want[k]):
      raise ValueError(f"checkpoint {step} of {workdir!r} holds a model of another configuration: {k} is "
                       f"{_saved_form(old[k])} there and {_saved_form(want[k])} here; nothing was moved")
  _, _, fresh = build_state(cfg)

  def pick(path, x):
    k = _path(path)
    if k not in old:
      return x
    return jax.random.wrap_key_data(jnp.asarray(old[k]), impl=jax.random.key_impl(x)) if _is_key(x) else \
        jnp.asarray(old[k], x.dtype)

  state = jax.tree_util.tree_map_with_path(pick, fresh)
  new, dropped = sorted(set(want) - set(old)), sorted(set(old) - set(want))
  tmp = tempfile.mkdtemp(prefix=".adapt-", dir=workdir)
  try:
    writer = Checkpointer(tmp, async_save=False)
    try:
      writer.save(step, state, data_state, dict(meta, adapted_from=os.path.join(REPLACED, str(step))))
    finally:
      writer.close()
    replaced = os.path.join(workdir, REPLACED, str(step))
    shutil.rmtree(replaced, ignore_errors=True)
    os.makedirs(os.path.dirname(replaced), exist_ok=True)
    os.rename(os.path.join(workdir, "checkpoints", str(step)), replaced)
    os.rename(os.path.join(tmp, "checkpoints", str(step)), os.path.join(workdir, "checkpoints", str(step)))
    record = os.path.join(CHECKSUMS, f"{step}.json")  # the integrity record travels with its checkpoint
    if os.path.exists(os.path.join(workdir, record)):
      os.replace(os.path.join(workdir, record), os.path.join(replaced, "attnlab_checksums.json"))
    os.makedirs(os.path.join(workdir, CHECKSUMS), exist_ok=True)
    os.replace(os.path.join(tmp, record), os.path.join(workdir, record))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  new_params = [k for k in new if k.startswith("params/")]
  msg = (f"checkpoint {step}: restored {len(old) - len(dropped)} arrays, initialised {len(new)} new: "
         f"{len(new_params)} parameters ({', '.join(p[len('params/'):] for p in new_params[:6])}"
         f"{', ...' if len(new_params) > 6 else ''}) and their optimizer state")
  if dropped:
    msg += f", dropped {len(dropped)} the configuration no longer has ({', '.join(dropped[:4])})"
  return msg + f"; the original is in {os.path.join(workdir, REPLACED, str(step))}"

"""Building and restoring the train state of an experiment (used by training, evaluation and analysis alike).

The train state is a dict of pytrees: ``params`` (the ``nnx.Param`` state, float32 master weights), ``rest``
(every other NNX variable: buffers the forward mutates, e.g. k-means EMAs, and RNG streams), ``opt_state`` and
``step``. Next to it come two graphdefs of the same model: one in train mode, one in eval mode.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.model.lm import DecoderLM
from attnlab.parallel.sharding import DEFAULT_RULES, state_shardings
from attnlab.state.checkpoint import Checkpointer
from attnlab.state.forward import split_model
from attnlab.state.optimizer import OptimizerConfig, make_optimizer


def init_state(model: nnx.Module, opt_cfg: OptimizerConfig, total_steps: int):
  """(train graphdef, eval graphdef, initial train state) of a freshly built model."""
  model.eval()
  eval_graphdef, _, _ = split_model(model)
  model.train()
  graphdef, params, rest = split_model(model)
  tx, _ = make_optimizer(opt_cfg, total_steps)
  state = {"params": params, "rest": rest, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  return graphdef, eval_graphdef, state


def build_state(cfg):
  """(train graphdef, eval graphdef, initial train state) of an ``ExperimentConfig``."""
  model = DecoderLM(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
  return init_state(model, cfg.optimizer, cfg.train.steps)


def build_sharded_state(cfg, mesh, rules=DEFAULT_RULES):
  """Like :func:`build_state`, but every array is created directly in its rules-given sharding on ``mesh`` (no
  process ever holds the whole unsharded state; every scalar is a replicated global array, as orbax needs)."""
  graphdefs = {}

  def create():
    graphdef, eval_graphdef, state = build_state(cfg)
    graphdefs.update(train=graphdef, eval=eval_graphdef)
    return state

  shardings = state_shardings(jax.eval_shape(create), mesh, rules)
  state = jax.jit(create, out_shardings=shardings)()
  return graphdefs["train"], graphdefs["eval"], state


def restore_state(cfg, workdir: str):
  """(step, eval graphdef, train state) of the newest readable checkpoint of ``workdir``; ValueError if none
  (nothing is created in a workdir without checkpoints)."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ValueError(f"no checkpoint in {workdir!r} to restore")
  _, eval_graphdef, state = build_state(cfg)
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  try:
    restored = ckpt.restore_latest(state)
  finally:
    ckpt.close()
  if restored is None:
    raise ValueError(f"no checkpoint in {workdir!r} to restore")
  step, state, _, _ = restored
  return step, eval_graphdef, state

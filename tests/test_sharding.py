"""The harness train step sharded over 8 virtual CPU devices (DP / FSDP / TP) equals the unsharded one."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from attnlab import AttentionConfig, DecoderLM, ModelConfig
from attnlab.data.pipeline import DataConfig, make_dataset
from attnlab.parallel import MeshConfig, data_shard, logical_to_spec, make_mesh, state_shardings
from attnlab.state import MODEL_INPUTS, build_sharded_state, build_state
from attnlab.train import ExperimentConfig, OptimizerConfig, TrainConfig
from attnlab.train.loop import data_layout
from attnlab.train.step import ShardedStep, train_step_fn

P = jax.sharding.PartitionSpec
CFG = ExperimentConfig(
    model=ModelConfig(vocab_size=259, d_model=32, num_layers=2, max_seq_len=16,
                      attention=AttentionConfig(num_heads=4, num_kv_heads=4)),
    data=DataConfig(seq_len=16, batch_size=8),
    optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
    train=TrainConfig(steps=2))
KEYS = MODEL_INPUTS + ("targets", "loss_mask")


def run(mesh_cfg: MeshConfig | None, steps=2):
  cfg = dataclasses.replace(CFG, mesh=mesh_cfg or MeshConfig(data=1))
  mesh, _, _ = data_layout(cfg)
  graphdef, _, state = build_state(cfg) if mesh is None else build_sharded_state(cfg, mesh)
  step = train_step_fn(graphdef, cfg.optimizer, cfg.train.steps, 0.0, 1, mesh)
  assert isinstance(step, ShardedStep) == (mesh is not None)
  data = make_dataset(cfg.data)
  placed = state["params"]["blocks"][0]["attn"]["qkv"]["q"]["kernel"].sharding
  losses = []
  for _ in range(steps):
    batch = {k: v for k, v in next(data).items() if k in KEYS}
    state, metrics = step(state, batch if mesh is None else jax.device_put(batch, step.shardings(state)[1]))
    losses.append(float(metrics["loss"]))
  return losses, state, placed


@pytest.fixture(scope="module")
def unsharded():
  return run(None)


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=8), MeshConfig(data=2, fsdp=4), MeshConfig(data=2, tensor=4),
                                      MeshConfig(data=1, fsdp=2, tensor=4)], ids=["dp", "fsdp", "tp", "fsdp_tp"])
def test_sharded_harness_step_matches_unsharded(unsharded, mesh_cfg):
  assert len(jax.devices()) == 8
  losses, state, placed = run(mesh_cfg)
  ref_losses, ref_state, _ = unsharded
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):  # params, optimizer state, step
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # Parameters and their Adam moments really are sharded as the rules say.
  assert placed.spec == P("fsdp", "tensor")
  mu = state["opt_state"][1][0].mu["blocks"][0]["attn"]["qkv"]["q"]["kernel"]
  assert mu.get_value().sharding.spec == P("fsdp", "tensor")


def test_parameter_specs_follow_the_rules_table():
  model = DecoderLM(CFG.model, rngs=nnx.Rngs(0))
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  sh = state_shardings(nnx.state(model, nnx.Param), mesh)
  # vocab 259 does not divide over tensor=2: that dimension is replicated, the embed one stays on fsdp.
  assert sh["embed"]["embedding"].spec == P(None, "fsdp")
  assert sh["blocks"][0]["mlp"]["down"]["kernel"].spec == P("tensor", "fsdp")
  assert sh["blocks"][0]["attn_norm"]["scale"].spec == P()


def test_data_shard_and_mesh_errors():
  assert data_shard(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))) == (0, 1)  # one process holds every row
  assert make_mesh(MeshConfig(data=1, tensor=2)).size == 2  # a subset of the devices (single process)
  with pytest.raises(ValueError, match="needs 12 devices"):
    MeshConfig(data=3, fsdp=4).shape(8)
  with pytest.raises(ValueError, match="at most one mesh axis"):
    MeshConfig(data=-1, fsdp=-1).shape(8)
  with pytest.raises(ValueError, match="cannot be split"):
    MeshConfig(data=-1, tensor=3).shape(8)
  with pytest.raises(ValueError, match="have no rule"):
    logical_to_spec(("embed", "experts"))
  with pytest.raises(ValueError, match="does not split over"):
    data_layout(dataclasses.replace(CFG, data=dataclasses.replace(CFG.data, batch_size=6)))

"""Sharded (DP / FSDP / TP over 8 virtual CPU devices) forward+backward+update equals the unsharded one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnlab import AttentionConfig, DecoderLM, ModelConfig
from attnlab.parallel import MeshConfig, global_batch, logical_to_spec, make_mesh, shard_module, state_shardings

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, attention=AttentionConfig(num_heads=4, num_kv_heads=4))
TX = optax.adamw(1e-2)


def train_step(graphdef, params, opt_state, tokens):
  def loss_fn(p):
    logits = nnx.merge(graphdef, p)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = TX.update(grads, opt_state, params)
  return loss, optax.apply_updates(params, updates), opt_state


STEP = jax.jit(train_step, static_argnums=0)


def run(mesh_cfg: MeshConfig | None, steps=2):
  model = DecoderLM(CFG, rngs=nnx.Rngs(0))
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (8, 9), 0, 64))
  if mesh_cfg is not None:
    mesh = make_mesh(mesh_cfg)
    shard_module(model, mesh)
    batch = global_batch(tokens, mesh)
  else:
    batch = jnp.asarray(tokens)
  graphdef, params = nnx.split(model, nnx.Param)
  placed = params["blocks"][0]["attn"]["qkv"]["q"]["kernel"].sharding
  opt_state = TX.init(params)
  losses = []
  for _ in range(steps):
    loss, params, opt_state = STEP(graphdef, params, opt_state, batch)
    losses.append(float(loss))
  return losses, params, placed


@pytest.fixture(scope="module")
def unsharded():
  return run(None)


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=8), MeshConfig(data=2, fsdp=4), MeshConfig(data=2, tensor=4),
                                      MeshConfig(data=1, fsdp=2, tensor=4)], ids=["dp", "fsdp", "tp", "fsdp_tp"])
def test_sharded_step_matches_unsharded(unsharded, mesh_cfg):
  assert len(jax.devices()) == 8
  losses, params, placed = run(mesh_cfg)
  ref_losses, ref_params, _ = unsharded
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # The parameters really are sharded as the rules say.
  assert placed.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_parameter_specs_follow_the_rules_table():
  model = DecoderLM(CFG, rngs=nnx.Rngs(0))
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  sh = state_shardings(nnx.state(model, nnx.Param), mesh)
  assert sh["embed"]["embedding"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert sh["blocks"][0]["mlp"]["down"]["kernel"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert sh["blocks"][0]["attn_norm"]["scale"].spec == jax.sharding.PartitionSpec()


def test_mesh_and_rules_errors():
  with pytest.raises(ValueError, match="needs 12 devices"):
    MeshConfig(data=3, fsdp=4).shape(8)
  with pytest.raises(ValueError, match="at most one mesh axis"):
    MeshConfig(data=-1, fsdp=-1).shape(8)
  with pytest.raises(ValueError, match="cannot be split"):
    MeshConfig(data=-1, tensor=3).shape(8)
  with pytest.raises(ValueError, match="have no rule"):
    logical_to_spec(("embed", "experts"))

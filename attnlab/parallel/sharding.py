"""Logical axis names -> mesh axes (the MaxText / t5x rules table), and sharding of model state and batches.

Parameters carry logical axis names as ``logical_axes`` metadata (set by :func:`attnlab.layers.kernel_init`);
one short rules table maps them to mesh axes. Unannotated parameters (norm scales, biases, sink logits) are
replicated.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("seq", None),
)


def logical_to_spec(axes: Sequence[str | None] | None, rules=DEFAULT_RULES) -> P:
  """PartitionSpec for a tuple of logical axis names (unknown names raise; None = replicated dim)."""
  if axes is None:
    return P()
  table = dict(rules)
  unknown = [a for a in axes if a is not None and a not in table]
  if unknown:
    raise ValueError(f"logical axes {unknown} have no rule; rules cover {sorted(table)}")
  return P(*(None if a is None else table[a] for a in axes))


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding tree matching ``state`` (an ``nnx.State``), from each Variable's ``logical_axes``."""

  def spec(v):
    if not isinstance(v, nnx.Variable):
      return NamedSharding(mesh, P())
    return v.replace(NamedSharding(mesh, logical_to_spec(v.get_metadata().get("logical_axes"), rules)))

  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_module(module: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> None:
  """Places every array of ``module`` according to its logical axes (in place)."""
  state = nnx.state(module)
  nnx.update(module, jax.device_put(state, state_shardings(state, mesh, rules)))


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of a (batch, ...) array: the batch split over the data-parallel axes."""
  return NamedSharding(mesh, logical_to_spec(("batch",), rules))


def global_batch(local: np.ndarray, mesh: Mesh, rules=DEFAULT_RULES) -> jax.Array:
  """Assembles the global batch from this process's rows (``jax.make_array_from_process_local_data``)."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh, rules), local)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())

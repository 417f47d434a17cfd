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


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """``spec`` with the dimensions its mesh axes do not divide replicated (e.g. a 259-token byte vocabulary
  under tensor parallelism 2), so any model shape runs on any mesh."""
  parts = []
  for i, entry in enumerate(tuple(spec)[:len(shape)]):
    size = int(np.prod([mesh.shape[a] for a in _mesh_axes(entry)]))
    parts.append(entry if shape[i] % size == 0 else None)
  return P(*parts)


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding tree matching ``state`` (any pytree of ``nnx.Variable``s and arrays, concrete or abstract),
  from each Variable's ``logical_axes``; dimensions the mesh does not divide, and unannotated leaves, are
  replicated."""

  def spec(v):
    if not isinstance(v, nnx.Variable):
      return NamedSharding(mesh, P())
    p = logical_to_spec(v.get_metadata().get("logical_axes"), rules)
    return v.replace(NamedSharding(mesh, fit_spec(p, v.get_value().shape, mesh)))

  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_module(module: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> None:
  """Places every array of ``module`` according to its logical axes (in place)."""
  state = nnx.state(module)
  nnx.update(module, jax.device_put(state, state_shardings(state, mesh, rules)))


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of a (batch, ...) array: the batch split over the data-parallel axes."""
  return NamedSharding(mesh, logical_to_spec(("batch",), rules))


def data_shard(mesh: Mesh, rules=DEFAULT_RULES) -> tuple[int, int]:
  """(index, count) of the batch slice this process feeds: its devices hold rows ``[index·b, (index+1)·b)`` of a
  global batch of ``count·b`` rows. Processes whose devices share a slice (the batch axes do not span them, e.g.
  tensor parallelism across hosts) get the same index and must read the same rows."""
  spec = batch_sharding(mesh, rules)
  rows = int(np.prod([mesh.shape[a] for a in _mesh_axes(spec.spec[0])]))
  slices = {(s[0].start or 0, rows if s[0].stop is None else s[0].stop)
            for s in spec.addressable_devices_indices_map((rows,)).values()}
  lo, hi = min(a for a, _ in slices), max(b for _, b in slices)
  if sum(b - a for a, b in slices) != hi - lo or rows % (hi - lo):
    raise ValueError(f"this process's devices hold a non-contiguous part of the batch on mesh {dict(mesh.shape)}; "
                     "order the mesh so that each process's devices are adjacent along the batch axes")
  return lo // (hi - lo), rows // (hi - lo)


def _mesh_axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def global_batch(local: np.ndarray, mesh: Mesh, rules=DEFAULT_RULES) -> jax.Array:
  """Assembles the global batch from this process's rows (``jax.make_array_from_process_local_data``); see
  :func:`data_shard` for which rows a process must hold."""
  _, count = data_shard(mesh, rules)
  return jax.make_array_from_process_local_data(batch_sharding(mesh, rules), local,
                                                (local.shape[0] * count, *local.shape[1:]))


def constrain(x: jax.Array, axes: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
  """``with_sharding_constraint`` by logical axis names under the mesh set with ``jax.set_mesh`` (the sharded
  train step sets it); a no-op without one, so unsharded code is unchanged."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())

"""Device mesh from config: axes ``data`` (pure data parallel), ``fsdp`` (data parallel with sharded parameters
and optimizer state, ZeRO-3 style) and ``tensor`` (Megatron-style tensor parallel over heads / MLP / vocab)."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from attnlab import fields

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; one of them may be -1 (inferred from the device count). The default puts every
  device on ``data`` (pure data parallelism; one device -> the plain unsharded step). Fixed sizes whose product
  is smaller than the device count use the first devices (single-process runs only, e.g. ``data = 1``)."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    for name in MESH_AXES:
      fields.integer("MeshConfig", name, getattr(self, name), minimum=-1)
      if getattr(self, name) == 0:
        raise ValueError(f"MeshConfig.{name} must be positive or -1 (inferred); got 0")
    if [self.data, self.fsdp, self.tensor].count(-1) > 1:
      raise ValueError(f"at most one mesh axis may be -1 (inferred); got {self}")

  def shape(self, num_devices: int) -> tuple[int, ...]:
    sizes = [self.data, self.fsdp, self.tensor]
    if sizes.count(-1) > 1:
      raise ValueError(f"at most one mesh axis may be -1 (inferred); got {self}")
    if any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"mesh axis sizes must be positive or -1; got {self}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"{num_devices} devices cannot be split into a mesh with fixed axes {self}")
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) > num_devices:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; {num_devices} exist")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over ``devices`` (default: all global devices), with Auto axis types so that
  XLA propagates shardings from the annotated parameters and batch."""
  devices = jax.devices() if devices is None else list(devices)
  shape = cfg.shape(len(devices))
  if math.prod(shape) < len(devices):
    if jax.process_count() > 1:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} leaves devices out; in a multi-process run it must "
                       f"cover all {len(devices)} devices (use -1 on one axis)")
    devices = devices[:math.prod(shape)]
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))

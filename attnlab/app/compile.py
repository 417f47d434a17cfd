"""``attnlab compile``: ahead-of-time compilation of the sharded train step for a TPU topology, on any machine
(MaxText ``train_compile.py`` style): an out-of-memory pod job shows up before the pod is booked.

``jax.experimental.topologies.get_topology_desc("v5e:2x2", "tpu")`` describes the target's devices without
owning them (it needs ``libtpu``, ``pip install 'attnlab[tpu]'``); the step is lowered on abstract arrays that
carry the target shardings and compiled by the TPU compiler; ``memory_analysis()`` gives the bytes per device.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from attnlab.app.workdir import load_config
from attnlab.parallel.mesh import make_mesh
from attnlab.parallel.sharding import DEFAULT_RULES, batch_sharding, state_shardings
from attnlab.state import build_state
from attnlab.train.step import train_step_fn


@dataclasses.dataclass
class CompileReport:
  topology: str
  num_devices: int
  num_hosts: int
  mesh: dict
  global_batch: int
  memory: object  # jax's CompiledMemoryStats (per device)

  def format(self) -> str:
    m = self.memory
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return "\n".join([
        f"topology {self.topology}: {self.num_devices} devices on {self.num_hosts} host(s), mesh {self.mesh}, "
        f"global batch {self.global_batch}",
        "memory per device:",
        f"  arguments (state + batch) {gib(m.argument_size_in_bytes)}",
        f"  outputs                   {gib(m.output_size_in_bytes)} (aliased/donated {gib(m.alias_size_in_bytes)})",
        f"  temporaries               {gib(m.temp_size_in_bytes)}",
        f"  generated code            {gib(m.generated_code_size_in_bytes)}",
        f"  total (args + out + temp - aliased) {gib(total)}"])


def topology_devices(topology: str, platform: str = "tpu"):
  """The devices of a named topology (e.g. ``v5e:2x2``, ``v5p:2x2x2``); a clear error without libtpu."""
  if platform == "tpu" and importlib.util.find_spec("libtpu") is None:
    raise RuntimeError("AOT compilation for a TPU topology needs libtpu on this machine (it holds the TPU "
                       "compiler): pip install 'attnlab[tpu]'")
  return topologies.get_topology_desc(topology, platform).devices


def compile_train_step(cfg, topology: str, *, platform: str = "tpu", rules=DEFAULT_RULES) -> CompileReport:
  """Lowers and compiles ``cfg``'s sharded train step for ``topology``; nothing is allocated on any device."""
  devices = topology_devices(topology, platform)
  mesh = make_mesh(cfg.mesh, devices)
  hosts = len({d.process_index for d in devices})
  graphdefs = {}

  def create():
    graphdef, _, state = build_state(cfg)
    graphdefs["train"] = graphdef
    return state

  abstract = jax.eval_shape(create)
  shardings = state_shardings(abstract, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  rows, seq = cfg.data.batch_size * hosts, cfg.data.seq_len
  if rows % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise ValueError(f"the global batch ({cfg.data.batch_size} per host × {hosts} hosts = {rows}) does not split "
                     f"over the mesh's data-parallel axes {dict(mesh.shape)}")
  bsh = batch_sharding(mesh, rules)
  batch = {k: jax.ShapeDtypeStruct((rows, seq), dt, sharding=bsh) for k, dt in
           (("inputs", jnp.int32), ("positions", jnp.int32), ("segment_ids", jnp.int32), ("targets", jnp.int32),
            ("loss_mask", jnp.float32))}
  step = train_step_fn(graphdefs["train"], cfg.optimizer, cfg.train.steps, cfg.train.z_loss, cfg.train.grad_accum,
                       mesh, rules)
  with jax.set_mesh(mesh):
    compiled = step.jitted(abstract).lower(abstract, batch).compile()
  return CompileReport(topology, len(devices), hosts, dict(mesh.shape), rows, compiled.memory_analysis())


def run(gin_files: Sequence[str], bindings: Sequence[str] = (), *, topology: str, platform: str = "tpu",
        search_paths: Sequence[str] = ()) -> int:
  """The ``attnlab compile`` job: prints the memory per device, or the reason it cannot compile (exit status 1)."""
  # Compile only: JAX itself stays on the CPU (no accelerator is claimed, also on a TPU VM), and libtpu may be
  # loaded by several such processes at once (otherwise they collide on /tmp/libtpu_lockfile).
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  cfg = load_config(gin_files, bindings, search_paths=search_paths)
  try:
    report = compile_train_step(cfg, topology, platform=platform)
  except RuntimeError as e:
    print(f"attnlab compile: error: {e}", file=sys.stderr)
    return 1
  print(report.format())
  return 0

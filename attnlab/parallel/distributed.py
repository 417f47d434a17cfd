"""Multi-process start-up through JAX's own multi-controller runtime (``jax.distributed``).

On TPU pods and SLURM/Open MPI clusters ``jax.distributed.initialize()`` detects everything itself; elsewhere
pass the coordinator address, process count and index (from config, CLI or the ``ATTNLAB_COORDINATOR``,
``ATTNLAB_NUM_PROCESSES``, ``ATTNLAB_PROCESS_ID`` environment variables). It must run before any other JAX call.
"""

from __future__ import annotations

import dataclasses
import os

import jax


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  coordinator_address: str | None = None  # "host:port" of process 0
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  auto: bool = False  # let JAX detect the cluster (TPU pods, SLURM, Open MPI)

  @classmethod
  def from_env(cls, base: "DistributedConfig | None" = None) -> "DistributedConfig":
    base = base or cls()
    env = os.environ
    return dataclasses.replace(
        base,
        coordinator_address=env.get("ATTNLAB_COORDINATOR", base.coordinator_address),
        num_processes=int(env["ATTNLAB_NUM_PROCESSES"]) if "ATTNLAB_NUM_PROCESSES" in env else base.num_processes,
        process_id=int(env["ATTNLAB_PROCESS_ID"]) if "ATTNLAB_PROCESS_ID" in env else base.process_id)

  @property
  def enabled(self) -> bool:
    return self.auto or self.coordinator_address is not None


def initialize(cfg: DistributedConfig) -> None:
  """Starts the multi-controller runtime when ``cfg`` asks for it; a no-op for single-process runs."""
  if not cfg.enabled:
    return
  if cfg.auto:
    jax.distributed.initialize()
    return
  if cfg.num_processes is None or cfg.process_id is None:
    raise ValueError("distributed start-up needs num_processes and process_id with coordinator_address "
                     f"(got {cfg})")
  if not 0 <= cfg.process_id < cfg.num_processes:
    raise ValueError(f"process_id {cfg.process_id} is outside [0, {cfg.num_processes})")
  jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                             process_id=cfg.process_id, local_device_ids=cfg.local_device_ids)


def is_main_process() -> bool:
  """True on the process that writes logs (process 0)."""
  return jax.process_index() == 0

"""Opening a run for a job: its gin configuration (given, or the one its workdir recorded) and, for multi-process
jobs, ``jax.distributed``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from attnlab.configs import build_distributed, build_experiment, parse_gin
from attnlab.parallel.distributed import DistributedConfig, initialize
from attnlab.train import ExperimentConfig


@dataclasses.dataclass(frozen=True)
class DistributedFlags:
  """Command-line overrides of ``DistributedConfig``; None = not given (gin and the environment decide)."""

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  auto: bool | None = None


def start_distributed(flags: DistributedFlags) -> None:
  """``jax.distributed.initialize`` from gin < environment < flags; must precede every other JAX call."""
  cfg = DistributedConfig.from_env(build_distributed())
  given = {k: v for k, v in dataclasses.asdict(flags).items() if v is not None}
  initialize(dataclasses.replace(cfg, **given))


def load_config(gin_files: Sequence[str], bindings: Sequence[str] = (), *, search_paths: Sequence[str] = (),
                distributed: DistributedFlags | None = None) -> ExperimentConfig:
  """Parses the gin files and bindings, starts ``jax.distributed`` when ``distributed`` is given, and builds the
  experiment."""
  parse_gin(list(gin_files), list(bindings), search_paths=search_paths)
  if distributed is not None:
    start_distributed(distributed)
  return build_experiment()


def open_workdir(workdir: str, gin_files: Sequence[str] = (), bindings: Sequence[str] = (), *,
                 search_paths: Sequence[str] = (), distributed: DistributedFlags | None = None) -> ExperimentConfig:
  """The experiment of a trained run: ``gin_files`` if given, else the ``config.gin`` its workdir recorded."""
  files = list(gin_files) or [os.path.join(workdir, "config.gin")]
  return load_config(files, bindings, search_paths=search_paths, distributed=distributed)

"""Opening a run for a job: its gin configuration (given, or the one its workdir recorded) and, for multi-process
jobs, ``jax.distributed``.

A workdir is data, not code: its recorded ``config.gin`` is parsed with every ``import`` line and gin's dynamic
registration refused (they could import any module and call any function, ``os.system`` included), so opening a
shared or downloaded workdir runs nothing the user did not name on their own command line. Workdirs of trusted
plugin runs (``import my_plugin`` in their gin files) open with ``--trust_workdir_imports``
(:func:`trust_workdir_imports`); gin files given with ``--gin_file`` are the user's own and import freely.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from attnlab.configs import build_distributed, build_experiment, parse_gin
from attnlab.parallel.distributed import DistributedConfig, initialize
from attnlab.train import ExperimentConfig

_TRUST = {"imports": False}


@dataclasses.dataclass(frozen=True)
class DistributedFlags:
  """Command-line overrides of ``DistributedConfig``; None = not given (gin and the environment decide)."""

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  auto: bool | None = None
  initialization_timeout: int | None = None
  heartbeat_timeout_seconds: int | None = None
  coordinator_bind_address: str | None = None


def trust_workdir_imports(trust: bool = True) -> None:
  """Let the workdirs this process opens import the modules their ``config.gin`` names (trusted plugin runs)."""
  _TRUST["imports"] = trust


def start_distributed(flags: DistributedFlags) -> None:
  """``jax.distributed.initialize`` from gin < environment < flags; must precede every other JAX call."""
  cfg = DistributedConfig.from_env(build_distributed())
  given = {k: v for k, v in dataclasses.asdict(flags).items() if v is not None}
  initialize(dataclasses.replace(cfg, **given))


def load_config(gin_files: Sequence[str], bindings: Sequence[str] = (), *, search_paths: Sequence[str] = (),
                distributed: DistributedFlags | None = None, untrusted: Sequence[str] = ()) -> ExperimentConfig:
  """Parses the gin files and bindings (``untrusted`` ones as data, see the module docstring), starts
  ``jax.distributed`` when ``distributed`` is given, and builds the experiment."""
  parse_gin(list(gin_files), list(bindings), search_paths=search_paths, untrusted=untrusted)
  if distributed is not None:
    start_distributed(distributed)
  return build_experiment()


def check_workdir_exists(workdir: str) -> None:
  """A workdir of a trained run: an existing directory (ValueError naming it otherwise)."""
  if not isinstance(workdir, str) or not workdir:
    raise ValueError(f"--workdir must be a directory; got {workdir!r}")
  if not os.path.exists(workdir):
    raise ValueError(f"workdir {workdir!r} does not exist")
  if not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir!r} is not a directory")


def open_workdir(workdir: str, gin_files: Sequence[str] = (), bindings: Sequence[str] = (), *,
                 search_paths: Sequence[str] = (), distributed: DistributedFlags | None = None,
                 trust_imports: bool | None = None) -> ExperimentConfig:
  """The experiment of a trained run: ``gin_files`` if given, else the ``config.gin`` its workdir recorded (read
  as data unless ``trust_imports``, default: :func:`trust_workdir_imports`)."""
  check_workdir_exists(workdir)
  if gin_files:
    return load_config(list(gin_files), bindings, search_paths=search_paths, distributed=distributed)
  path = os.path.join(workdir, "config.gin")
  if not os.path.isfile(path):
    raise ValueError(f"workdir {workdir!r} holds no config.gin (not a trained run, or its start failed); give "
                     "--gin_file")
  trust = _TRUST["imports"] if trust_imports is None else trust_imports
  return load_config([path], bindings, search_paths=search_paths, distributed=distributed,
                     untrusted=() if trust else [path])

"""gin registration, parsing and the config files a run leaves in its workdir."""

from __future__ import annotations

import os
import warnings

import gin

import attnlab.attention.variants  # noqa: F401  (registers every attention kind)
from attnlab.analysis.config import AnalysisConfig
from attnlab.attention.config import AttentionConfig
from attnlab.attention.registry import attention_config_class, attention_kinds
from attnlab.data import synthetic
from attnlab.data.pipeline import DataConfig
from attnlab.data.special_tokens import LandmarkTokens, MetaTokens
from attnlab.eval.config import EvalConfig
from attnlab.model.config import ModelConfig
from attnlab.parallel.distributed import DistributedConfig
from attnlab.parallel.mesh import MeshConfig
from attnlab.train.config import OptimizerConfig, TrainConfig
from attnlab.train.experiment import ExperimentConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARTS = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig, "train": TrainConfig,
         "eval": EvalConfig, "analysis": AnalysisConfig, "mesh": MeshConfig}
_REGISTERED: dict[str, type] = {}
_WRAPPED: dict[type, object] = {}


class ConfigError(ValueError):
  """A gin configuration that cannot be parsed or built (unknown binding, missing value, bad value)."""


def _attention_classes() -> list[type]:
  found, todo = [], [AttentionConfig, *(attention_config_class(k) for k in attention_kinds())]
  while todo:
    cls = todo.pop()
    if cls not in found and cls not in _WRAPPED.values():  # gin's wrappers are subclasses too
      found.append(cls)
      todo.extend(cls.__subclasses__())
  return found


def register_configurables() -> None:
  """Registers (idempotently) every config class with gin under its class name."""
  for cls in [*PARTS.values(), DistributedConfig, *_attention_classes(), *synthetic.task_config_classes(),
              LandmarkTokens, MetaTokens]:
    name = cls.__name__
    if name in _REGISTERED:
      if _REGISTERED[name] is not cls:
        raise ConfigError(f"two config classes are named {name!r} ({_REGISTERED[name].__module__} and "
                          f"{cls.__module__}); gin needs unique names")
      continue
    _WRAPPED[cls] = gin.external_configurable(cls, name=name, module="attnlab")
    _REGISTERED[name] = cls


def parse_gin(gin_files=(), bindings=(), *, search_paths=()) -> None:
  """Clears gin, registers the configs and parses ``gin_files`` then ``bindings`` (later ones win).
  ``include`` paths resolve against the search paths, the current directory, each file's folder and its parent,
  and the repository root."""
  gin.clear_config(clear_constants=True)
  register_configurables()
  file_dirs = [d for f in gin_files for d in (os.path.dirname(os.path.abspath(f)),
                                              os.path.dirname(os.path.dirname(os.path.abspath(f))))]
  for p in (*search_paths, os.getcwd(), *file_dirs, REPO_ROOT):
    gin.add_config_file_search_path(p)
  for f in gin_files:
    if not os.path.isfile(f) and not os.path.isfile(os.path.join(REPO_ROOT, f)):
      raise ConfigError(f"gin file {f!r} does not exist")
  try:
    gin.parse_config_files_and_bindings(
        [f if os.path.isfile(f) else os.path.join(REPO_ROOT, f) for f in gin_files], list(bindings))
  except (ValueError, KeyError, SyntaxError, TypeError, IOError) as e:
    raise ConfigError(f"invalid gin configuration: {e}") from e


def _unused_bindings() -> list[str]:
  bound = {(scope, selector, param) for (scope, selector), params in gin.config._CONFIG.items()
           for param in params}
  used = {(scope, selector, param) for (scope, selector), params in gin.config._OPERATIVE_CONFIG.items()
          for param in params}
  return sorted(f"{(s + '/') if s else ''}{sel.split('.')[-1]}.{p}" for s, sel, p in bound - used)


def build_distributed() -> DistributedConfig:
  """The ``DistributedConfig`` bound in gin (``DistributedConfig.coordinator_address = '10.0.0.1:1234'``, ...).
  Build it before :func:`build_experiment` (it is not part of the experiment: it says where this process runs)."""
  try:
    return _WRAPPED[DistributedConfig]()
  except (TypeError, ValueError) as e:
    raise ConfigError(f"invalid DistributedConfig: {e}") from e


def build_experiment() -> ExperimentConfig:
  """Builds the ``ExperimentConfig`` from the parsed gin config: each part is constructed through gin
  (``ModelConfig.d_model = 64``, ``ModelConfig.attention = @AttentionConfig()``, ...). Bindings no built
  config used are reported with a warning (e.g. ``AttentionConfig.*`` after switching to a variant)."""
  try:
    parts = {k: _WRAPPED[cls]() for k, cls in PARTS.items()}
    cfg = ExperimentConfig(**parts)
  except TypeError as e:
    raise ConfigError(f"cannot build the configuration: {e}") from e
  except ValueError as e:
    raise ConfigError(f"invalid configuration: {e}") from e
  unused = _unused_bindings()
  if unused:
    warnings.warn(f"gin bindings not used by this configuration: {', '.join(unused)}", stacklevel=2)
  return cfg


def write_run_configs(workdir: str, header: str = "") -> None:
  """``config.gin``: every binding as given (includes resolved, self-contained; re-parsable by ``attnlab eval``);
  ``operative_config.gin``: every parameter the built configs used, defaults included."""
  os.makedirs(workdir, exist_ok=True)
  for name, text in (("config.gin", gin.config_str()), ("operative_config.gin", gin.operative_config_str())):
    with open(os.path.join(workdir, name), "w") as f:
      f.write(header + text)

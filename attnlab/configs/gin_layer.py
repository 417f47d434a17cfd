"""gin registration, parsing and the config files a run leaves in its workdir.

Gin files are found as given (relative to the working directory) or else in the experiments shipped with the
package (``attnlab/experiments``, the repository's ``experiments/``): ``experiments/smoke_tiny.gin`` works from any
directory. Plugins: the ``import`` lines of the gin files (and of their includes) are imported first, with the
working directory and the search paths on ``sys.path``, so a user's module may register score functions, attention
variants (``AttentionConfig`` subclasses) and data tasks; the configurables are registered after that.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import tokenize
import warnings

import gin
from gin import config_parser

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
from attnlab.state.optimizer import OptimizerConfig
from attnlab.train.config import TrainConfig
from attnlab.train.experiment import ExperimentConfig

EXPERIMENTS = "experiments"
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


def packaged_experiments() -> str | None:
  """The folder of the experiments shipped with the package (``attnlab.experiments``), or None in a source tree
  that is not installed."""
  spec = importlib.util.find_spec(f"attnlab.{EXPERIMENTS}")
  return None if spec is None else list(spec.submodule_search_locations)[0]


def resolve_path(path: str) -> str:
  """``path`` if it exists, else its packaged copy (``experiments/...`` in ``attnlab/experiments``), else ``path``
  unchanged (the caller reports it missing)."""
  packaged = packaged_experiments()
  if os.path.exists(path) or packaged is None:
    return path
  head, _, tail = os.path.normpath(path).partition(os.sep)
  candidate = os.path.join(packaged, tail)
  return candidate if head == EXPERIMENTS and tail and os.path.exists(candidate) else path


class _SkipValues(config_parser.ParserDelegate):
  """Reads only the statements of a gin file (values become None)."""

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return None

  def macro(self, macro_name):
    return None


def _import_modules(gin_files, search_paths) -> None:
  """Imports the modules named by ``import`` lines of ``gin_files`` and of their includes, with the working
  directory and the search paths on ``sys.path``."""
  for p in reversed([os.getcwd(), *search_paths]):
    if p not in sys.path:
      sys.path.insert(0, p)
  todo, seen = list(gin_files), set()
  while todo:
    path = todo.pop()
    if path in seen:
      continue
    seen.add(path)
    try:
      with open(path) as f:
        statements = list(config_parser.ConfigParser(f, _SkipValues()))
    except (SyntaxError, tokenize.TokenError) as e:
      msg = e.msg if isinstance(e, SyntaxError) else e.args[0]
      raise ConfigError(f"gin file {path!r}: invalid gin syntax ({msg})") from None
    for st in statements:
      if isinstance(st, config_parser.IncludeStatement):
        found = [os.path.join(p, st.filename) for p in gin.config._LOCATION_PREFIXES
                 if os.path.isfile(os.path.join(p, st.filename))]
        todo.extend(found[:1])  # a missing include is reported by gin's own parse
      elif isinstance(st, config_parser.ImportStatement) and not st.module.startswith("__gin__."):
        module = st.module.rsplit(".", 1)[0] if st.is_from else st.module
        try:
          importlib.import_module(module)
        except ImportError as e:
          raise ConfigError(f"{path} imports {module!r}, which is importable neither from the working directory "
                            f"nor from the gin search paths ({e})") from e


class UntrustedCodeError(ConfigError):
  """A gin file that is data (a workdir's ``config.gin``) asks to import a module or to register functions."""


def _included(path: str, filename: str) -> str | None:
  for p in (*gin.config._LOCATION_PREFIXES, os.path.dirname(os.path.abspath(path))):
    if os.path.isfile(os.path.join(p, filename)):
      return os.path.join(p, filename)
  return None


def check_no_code(path: str, trust_hint: str = "") -> None:
  """Refuses (:class:`UntrustedCodeError`) a gin file that, itself or through its includes, imports a module
  (``import x``) or turns on gin's dynamic registration (``from __gin__ import dynamic_registration``, which lets
  a file bind and call any importable function, ``os.system`` included). Such a file is read as data: only the
  configurables attnlab itself registered can be named in it."""
  todo, seen = [path], set()
  while todo:
    p = todo.pop()
    if p in seen:
      continue
    seen.add(p)
    try:
      with open(p) as f:
        statements = list(config_parser.ConfigParser(f, _SkipValues()))
    except (OSError, UnicodeDecodeError) as e:
      raise ConfigError(f"gin file {p!r} is unreadable ({e})") from None
    except SyntaxError as e:
      raise ConfigError(f"gin file {p!r}: invalid gin syntax ({e.msg}, line {e.lineno})") from None
    except tokenize.TokenError as e:
      raise ConfigError(f"gin file {p!r}: invalid gin syntax ({e.args[0]})") from None
    for st in statements:
      if isinstance(st, config_parser.IncludeStatement):
        found = _included(p, st.filename)
        if found is None:
          raise ConfigError(f"gin file {p!r} includes {st.filename!r}, which does not exist")
        todo.append(found)
      elif isinstance(st, config_parser.ImportStatement):
        what = ("turns on gin's dynamic registration (it can call any function)" if st.module.startswith("__gin__")
                else f"imports the module {st.module!r}")
        raise UntrustedCodeError(f"{path}{'' if p == path else f' (through {p})'} {what}; opening a workdir runs no "
                                 f"code from it{trust_hint}")


@contextlib.contextmanager
def _includes_from_files_only(active: bool):
  """While ``active``, gin opens includes only as files: its other reader (``gin.resource_reader``) reads
  ``include 'a/b/x.gin'`` as a resource of the package ``a.b``, which imports ``a`` and runs its code."""
  readers = gin.config._FILE_READERS
  if active:
    gin.config._FILE_READERS = [(open, os.path.isfile)]
  try:
    yield
  finally:
    gin.config._FILE_READERS = readers


def parse_gin(gin_files=(), bindings=(), *, search_paths=(), untrusted=()) -> None:
  """Clears gin, imports the gin files' ``import`` modules, registers the configs and parses ``gin_files`` then
  ``bindings`` (later ones win). Files and ``include`` paths resolve against the search paths, the current
  directory, each file's folder and its parent, and the packaged experiments. ``untrusted``: files (among
  ``gin_files``) read as data: any import or dynamic registration in them (or their includes) is refused before
  anything is imported (:func:`check_no_code`), and includes are then opened only as files."""
  gin.clear_config(clear_constants=True)
  gin_files = [resolve_path(f) for f in gin_files]
  for f in gin_files:
    if not os.path.isfile(f):
      raise ConfigError(f"gin file {f!r} does not exist" if not os.path.isdir(f) else
                        f"gin file {f!r} is a directory")
  packaged = packaged_experiments()
  file_dirs = [d for f in gin_files for d in (os.path.dirname(os.path.abspath(f)),
                                              os.path.dirname(os.path.dirname(os.path.abspath(f))))]
  for p in (*search_paths, os.getcwd(), *file_dirs, *([os.path.dirname(packaged)] if packaged else [])):
    gin.add_config_file_search_path(p)
  for f in untrusted:
    check_no_code(resolve_path(f), " (pass --trust_workdir_imports if you trust it)")
  for b in bindings:
    if not str(b).strip() or str(b).strip().endswith("="):
      raise ConfigError(f"gin binding {str(b)!r} has no value (write KEY=VALUE)")
  try:
    _import_modules(gin_files, search_paths)
    register_configurables()
    with _includes_from_files_only(bool(untrusted)):
      gin.parse_config_files_and_bindings(gin_files, list(bindings))
  except ConfigError:
    raise
  except tokenize.TokenError as e:
    raise ConfigError(f"invalid gin syntax in {', '.join(gin_files) or 'the bindings'}: {e.args[0]} (an unclosed "
                      f"bracket?) in {' '.join(map(str, bindings)) or 'the files'}") from None
  except SyntaxError as e:
    where = f" in {e.filename}" if e.filename and e.filename != "<string>" else ""
    raise ConfigError(f"invalid gin syntax{where}: {e.msg} at line {e.lineno}: {(e.text or '').strip()!r}") from None
  except (ValueError, KeyError, TypeError, IOError, AttributeError, NameError, ImportError) as e:
    raise ConfigError(f"invalid gin configuration: {_one_line(e)}") from None


def _gin_message(e: BaseException) -> str:
  """The error without the "In call to configurable ..." lines gin appends."""
  return _one_line(str(e).split("\n  In call to configurable")[0])


def _one_line(e) -> str:
  text = " ".join(str(e).split())
  return text[:500] if text else type(e).__name__


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
    raise ConfigError(_gin_message(e)) from None


def build_experiment() -> ExperimentConfig:
  """Builds the ``ExperimentConfig`` from the parsed gin config: each part is constructed through gin
  (``ModelConfig.d_model = 64``, ``ModelConfig.attention = @AttentionConfig()``, ...). Bindings no built
  config used are reported with a warning (e.g. ``AttentionConfig.*`` after switching to a variant)."""
  try:
    parts = {k: _WRAPPED[cls]() for k, cls in PARTS.items()}
    cfg = ExperimentConfig(**parts)
  except TypeError as e:
    raise ConfigError(f"cannot build the configuration: {_gin_message(e)}") from None
  except ValueError as e:
    raise ConfigError(_gin_message(e)) from None
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

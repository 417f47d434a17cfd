"""``attnlab import``: a Hugging Face checkpoint (a local directory or a hub model id) -> an ordinary attnlab workdir.

The workdir holds what ``attnlab train`` leaves: ``config.gin`` (the imported ``ModelConfig`` and the data /
tokenizer bindings, as gin bindings), ``operative_config.gin``, the run record (``run_config.txt``) and an orbax
checkpoint at step 0 in the train-state layout of :mod:`attnlab.state.train_state` (the imported parameters, a
fresh optimizer state, the rest); plus ``tokenizer/`` (the checkpoint's own tokenizer files; ``DataConfig.tokenizer``
points at it, so BOS/EOS/PAD come from them) and ``import.json`` (where it came from). ``attnlab eval``, ``sinks``,
``stream`` and ``train`` then work on it unchanged.

Everything is built and checked first; the workdir is written last, in one rename of a finished sibling folder, so
a bad input (missing config.json or weights, unknown ``model_type``, an unsupported option, a truncated or
mismatched safetensors file, a tokenizer with ids beyond ``vocab_size``, a missing revision, offline with an
uncached hub id, a workdir holding another run) leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile

import jax

from attnlab.configs import ConfigError, build_experiment, parse_gin, write_run_configs
from attnlab.data.tokenizer import check_fits_vocab
from attnlab.model.config import ModelConfig
from attnlab.pretrained import hf_model_config, hf_tokenizer, load_hf, read_hf_config
from attnlab.state import Checkpointer, build_state, init_state
from attnlab.train import ExperimentConfig, check_workdir
from attnlab.train.loop import RUN_CONFIG

HUB_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HUB_BIN_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")  # only when there is no safetensors
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")
TOKENIZER_DIR = "tokenizer"
IMPORT_RECORD = "import.json"
DEFAULT_SEQ_LEN = 128  # DataConfig.seq_len of the imported run (eval / sinks / train), capped by max_seq_len
FINETUNE_LR = 1e-4  # OptimizerConfig.learning_rate bound for continued training (the default 3e-3 is for scratch)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def download(repo_id: str, revision: str | None = None) -> tuple[str, dict]:
  """(local snapshot directory, provenance) of hub model ``repo_id`` at ``revision`` (config, safetensors and
  tokenizer files only). Honours ``HF_HUB_OFFLINE=1`` (then only the local cache is used). Errors: ValueError."""
  try:
    import huggingface_hub  # optional dependency (extra "hf")
    from huggingface_hub import errors
  except ImportError:
    raise ValueError(f"{repo_id!r} is not a local directory, and downloading it needs huggingface_hub "
                     "(pip install 'attnlab[hf]')") from None
  try:
    path = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_PATTERNS))
    if not any(f.endswith(".safetensors") for f in os.listdir(path)):  # older revisions: pytorch_model.bin only
      path = huggingface_hub.snapshot_download(repo_id, revision=revision,
                                               allow_patterns=list(HUB_PATTERNS + HUB_BIN_PATTERNS))
  except errors.RevisionNotFoundError:
    raise ValueError(f"revision {revision!r} does not exist for {repo_id}") from None
  except errors.RepositoryNotFoundError:
    raise ValueError(f"no model {repo_id!r} on the Hugging Face hub (or it is gated/private: log in with "
                     "`huggingface-cli login`)") from None
  except errors.LocalEntryNotFoundError:
    if huggingface_hub.constants.HF_HUB_OFFLINE:
      raise ValueError(f"HF_HUB_OFFLINE=1 and {repo_id}"
                       + (f" at revision {revision!r}" if revision else "")
                       + " is not in the local Hugging Face cache; download it once online, or unset "
                       "HF_HUB_OFFLINE") from None
    raise ValueError(f"cannot download {repo_id} (no connection to the Hugging Face hub?) and it is not in the "
                     "local cache") from None
  except errors.HfHubHTTPError as e:
    raise ValueError(f"downloading {repo_id} failed: {str(e).splitlines()[0]}") from None
  commit = os.path.basename(os.path.normpath(path))
  return path, {"hub_id": repo_id, "revision": revision, "commit": commit}


def resolve_source(src: str, revision: str | None = None) -> tuple[str, dict]:
  """(local checkpoint directory, provenance) of ``src``: a local directory as is, else a hub model id."""
  if os.path.isdir(src):
    if revision is not None:
      raise ValueError(f"--revision applies to hub model ids; {src!r} is a local directory")
    return src, {"directory": os.path.abspath(src)}
  if not _HUB_ID.match(src) or src.startswith((".", "/")):
    raise ValueError(f"{src!r} is neither a local directory nor a Hugging Face hub model id (org/name)")
  return download(src, revision)


def _gin_value(value) -> str:
  if isinstance(value, tuple):
    return "(" + "".join(_gin_value(v) + ", " for v in value).rstrip(" ") + ")"
  if isinstance(value, (bool, int, float, str)) or value is None:
    return repr(value)
  raise ValueError(f"internal: cannot write {value!r} as a gin value")


def _fields(obj) -> dict:
  return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def model_bindings(cfg: ModelConfig) -> list[str]:
  """``cfg`` as gin bindings, every field written (not only non-defaults, so the imported model does not move when
  a default changes). A per-layer attention tuple shares its common fields unscoped (so that
  ``AttentionConfig.sink_logit = True`` on the command line still reaches every layer) and scopes the rest."""
  lines = []
  for name, value in _fields(cfg).items():
    if name != "attention":
      lines.append(f"ModelConfig.{name} = {_gin_value(value)}")
  pattern = cfg.attention_pattern
  classes = {type(a).__name__ for a in pattern}
  if len(classes) != 1:
    raise ValueError(f"internal: an imported model with attention classes {sorted(classes)}")
  cls = classes.pop()
  per_layer = [_fields(a) for a in pattern]
  common = {k: v for k, v in per_layer[0].items() if all(p[k] == v for p in per_layer)}
  lines += [f"{cls}.{k} = {_gin_value(v)}" for k, v in common.items()]
  if isinstance(cfg.attention, tuple):
    refs = []
    for i, p in enumerate(per_layer):
      refs.append(f"@layer{i}/{cls}()")
      lines += [f"layer{i}/{cls}.{k} = {_gin_value(v)}" for k, v in p.items() if k not in common]
    lines.append(f"ModelConfig.attention = ({', '.join(refs)},)")
  else:
    lines.append(f"ModelConfig.attention = @{cls}()")
  return lines


def experiment_bindings(model: ModelConfig, tokenizer_dir: str) -> list[str]:
  """The gin bindings of an imported run: the model, its tokenizer, a sequence length it accepts, and a
  fine-tuning learning rate."""
  return [*model_bindings(model), f"DataConfig.tokenizer = {tokenizer_dir!r}",
          f"DataConfig.seq_len = {min(DEFAULT_SEQ_LEN, model.max_seq_len)}",
          f"OptimizerConfig.learning_rate = {FINETUNE_LR!r}"]


def _check_state(cfg: ExperimentConfig, state) -> None:
  """The imported train state has exactly the tree, shapes and dtypes :func:`attnlab.state.build_state` builds."""
  want = jax.eval_shape(lambda: build_state(cfg)[2])
  got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  if jax.tree.structure(want) != jax.tree.structure(got):
    raise ValueError("internal: the imported train state's tree differs from the one attnlab train builds")
  for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    if (w.shape, w.dtype) != (g.shape, g.dtype):
      raise ValueError(f"internal: {jax.tree_util.keystr(path)} is {g.shape} {g.dtype}; attnlab train builds "
                       f"{w.shape} {w.dtype}")


def _workdir_state(workdir: str) -> str | None:
  """None: absent or empty; else the text of its run record ('' if it has none)."""
  if not os.path.exists(workdir):
    return None
  if not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir!r} exists and is not a directory")
  if not os.listdir(workdir):
    return None
  path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.isfile(path):
    return ""
  with open(path) as f:
    return f.read()


def _read_import_record(workdir: str) -> dict | None:
  try:
    with open(os.path.join(workdir, IMPORT_RECORD)) as f:
      out = json.load(f)
  except (OSError, ValueError):
    return None
  return out if isinstance(out, dict) else None


def import_hf(src: str, workdir: str, *, revision: str | None = None, dtype: str = "float32",
              max_seq_len: int | None = None, command_line: str = "") -> tuple[ExperimentConfig, bool]:
  """Imports ``src`` into ``workdir``; returns (the run's config, whether anything was written: False when the
  workdir already holds this very import). Every error is a ValueError (ConfigError) and leaves ``workdir``
  untouched."""
  workdir = os.path.abspath(workdir)
  existing = _workdir_state(workdir)
  if existing == "":
    raise ValueError(f"workdir {workdir!r} is not empty and holds no attnlab run; give a new or empty workdir")
  src_dir, provenance = resolve_source(src, revision)
  config = read_hf_config(src_dir)
  model_cfg = hf_model_config(config, dtype=dtype, max_seq_len=max_seq_len)  # refuses unknown types / options
  tok = hf_tokenizer(src_dir)
  if tok is None:
    raise ValueError(f"{src_dir} has no tokenizer.json; attnlab needs the model's tokenizer (eval, sinks, stream, "
                     "train read text with it)")
  check_fits_vocab(tok, model_cfg.vocab_size, f"{src_dir}/tokenizer.json")

  tokenizer_dir = os.path.join(workdir, TOKENIZER_DIR)
  parse_gin([], experiment_bindings(model_cfg, tokenizer_dir))
  cfg = build_experiment()
  if cfg.model != model_cfg:
    raise ValueError(f"internal: the gin bindings rebuild {cfg.model}, not the imported {model_cfg}")

  parent = os.path.dirname(workdir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(workdir)}.import-", dir=parent)
  try:
    header = (f"# attnlab {command_line}\n# imported from {json.dumps(provenance)}\n\n" if command_line else
              f"# imported from {json.dumps(provenance)}\n\n")
    write_run_configs(tmp, header)
    check_workdir(tmp, cfg)  # the run record, as attnlab train writes it
    with open(os.path.join(tmp, RUN_CONFIG)) as f:
      record = f.read()
    if existing is not None:
      if existing != record:
        raise ValueError(f"workdir {workdir!r} holds a run of a different configuration (see "
                         f"{os.path.join(workdir, RUN_CONFIG)}); give a new workdir")
      before = _read_import_record(workdir)
      if before is None or {k: before.get(k) for k in provenance} != provenance:
        raise ValueError(f"workdir {workdir!r} holds a run of the same configuration but not this import "
                         f"({json.dumps(before) if before else 'not imported'}); give a new workdir")
      return cfg, False

    _, model = load_hf(src_dir, dtype=dtype, max_seq_len=max_seq_len)  # every tensor mapped and shape-checked
    _, _, state = init_state(model, cfg.optimizer, cfg.train.steps)
    _check_state(cfg, state)
    os.makedirs(os.path.join(tmp, TOKENIZER_DIR))
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(src_dir, name)):
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(tmp, TOKENIZER_DIR, name))
    with open(os.path.join(tmp, IMPORT_RECORD), "w") as f:
      json.dump({**provenance, "model_type": config["model_type"], "dtype": dtype,
                 "max_seq_len": model_cfg.max_seq_len, "vocab_size": model_cfg.vocab_size,
                 "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}, f, indent=1)
    ckpt = Checkpointer(tmp, keep=cfg.train.keep_checkpoints, async_save=False)
    try:
      ckpt.save(0, state, {"step": 0}, {"step": 0, "imported": True})
    finally:
      ckpt.close()
    os.chmod(tmp, 0o755)  # mkdtemp's 0o700 is not what a workdir gets
    os.rename(tmp, workdir)  # atomic; replaces an empty workdir
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return cfg, True


def run(src: str, workdir: str, *, revision: str | None = None, dtype: str = "float32",
        max_seq_len: int | None = None, command_line: str = "") -> int:
  """The ``attnlab import`` job. Returns the exit status."""
  try:
    cfg, wrote = import_hf(src, workdir, revision=revision, dtype=dtype, max_seq_len=max_seq_len,
                           command_line=command_line)
  except ConfigError:
    raise
  except (ValueError, OSError) as e:
    raise ConfigError(str(e)) from None
  m = cfg.model
  what = (f"{m.num_layers} layers, d_model {m.d_model}, {m.attention_pattern[0].num_heads} heads, vocab "
          f"{m.vocab_size}, max_seq_len {m.max_seq_len}, {m.dtype}")
  if not wrote:
    print(f"{os.path.abspath(workdir)} already holds this import ({what}); nothing written")
  else:
    print(f"imported {src} ({what}) into {os.path.abspath(workdir)} (checkpoint at step 0)")
  return 0

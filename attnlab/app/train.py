"""``attnlab train``: check the workdir, record the run's configs, train (resuming), then evaluate into eval.json."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax

from attnlab.app.loading import adapt_checkpoint
from attnlab.app.workdir import DistributedFlags, load_config
from attnlab.configs import ConfigError, write_run_configs
from attnlab.data.tokenizer import make_tokenizer
from attnlab.eval.run import run_evaluation
from attnlab.train import ExperimentConfig, TrainResult, check_workdir, train


def check_tokenizer(tok, vocab_size: int, where: str) -> None:
  """A tokenizer whose ids (vocabulary or BOS/EOS/PAD) reach past the model's ``vocab_size`` is an error (it
  would index past the embedding table: NaN losses)."""
  ids = {"its vocabulary": tok.vocab_size - 1, "BOS": tok.bos_id, "EOS": tok.eos_id, "PAD": tok.pad_id}
  bad = {k: v for k, v in ids.items() if v >= vocab_size}
  if bad:
    raise ConfigError(f"{where}: token ids must be < the model's vocab_size {vocab_size}, but the tokenizer's "
                      + ", ".join(f"{k} {'reaches ' if k.startswith('its') else 'is '}{v}" for k, v in bad.items()))


def train_and_evaluate(cfg: ExperimentConfig, workdir: str, *, force: bool = False) -> tuple[TrainResult, dict | None]:
  """Trains ``cfg`` in ``workdir``; when it finishes and ``TrainConfig.eval_at_end``, runs the full evaluation
  (``eval.json``). Returns (train result, evaluation or None)."""
  result = train(cfg, workdir, force=force)
  if result.status != "finished" or not cfg.train.eval_at_end:
    return result, None
  state = result.state
  return result, run_evaluation(cfg, result.eval_graphdef, state["params"], state["rest"], workdir, step=result.step)


def run(workdir: str, gin_files: Sequence[str], bindings: Sequence[str] = (), *, search_paths: Sequence[str] = (),
        force: bool = False, distributed: DistributedFlags = DistributedFlags(), command_line: str = "") -> int:
  """The ``attnlab train`` job; ``command_line`` heads the recorded ``config.gin``. Returns the exit status."""
  cfg = load_config(gin_files, bindings, search_paths=search_paths, distributed=distributed)
  if cfg.data.source != "synthetic":  # synthetic tasks have their own vocabulary
    check_tokenizer(make_tokenizer(cfg.data.tokenizer), cfg.model.vocab_size,
                    f"DataConfig.tokenizer {cfg.data.tokenizer!r}")
  check_workdir(workdir, cfg, force=force)
  main = jax.process_index() == 0
  if force and jax.process_count() == 1:  # a changed config may add parameters: restore what exists, init the new
    adapted = adapt_checkpoint(cfg, workdir)
    if adapted:
      print(adapted)
  if main:
    write_run_configs(workdir, f"# attnlab {command_line}\n\n")
  result, evaluation = train_and_evaluate(cfg, workdir, force=force)
  if not main:
    return 0
  last = result.history[-1] if result.history else {}
  print(f"{result.status} at step {result.step}" + (f", loss {last['loss']:.4f}" if last else "") +
        f"; workdir {os.path.abspath(workdir)}")
  if evaluation and evaluation.get("heldout"):
    print(evaluation["length_extrapolation_table"])
  if evaluation and "passkey_table" in evaluation:
    print(evaluation["passkey_table"])
  return 0

"""``attnlab train``: check the workdir, record the run's configs, train (resuming), then evaluate into eval.json."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax

from attnlab.app.workdir import DistributedFlags, load_config
from attnlab.configs import write_run_configs
from attnlab.eval.run import run_evaluation
from attnlab.train import ExperimentConfig, TrainResult, check_workdir, train


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
  check_workdir(workdir, cfg, force=force)
  main = jax.process_index() == 0
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

"""``attnlab train``: check the workdir, record the run's configs, train (resuming), then evaluate into eval.json."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax

from attnlab.app.loading import adapt_checkpoint
from attnlab.app.workdir import DistributedFlags, load_config
from attnlab.configs import write_run_configs
from attnlab.eval.run import run_evaluation
from attnlab.train import ExperimentConfig, TrainResult, train
from attnlab.train.stop import failpoint


def train_and_evaluate(cfg: ExperimentConfig, workdir: str, *, force: bool = False,
                       on_started: Callable[[], None] | None = None) -> tuple[TrainResult, dict | None]:
  """Trains ``cfg`` in ``workdir``; when it finishes and ``TrainConfig.eval_at_end``, runs the full evaluation
  (``eval.json``). ``on_started``: called (process 0) once start-up succeeded, before the first step. Returns
  (train result, evaluation or None)."""
  result = train(cfg, workdir, force=force, on_started=on_started)
  if result.status != "finished" or not cfg.train.eval_at_end:
    return result, None
  failpoint("eval")
  state = result.state
  return result, run_evaluation(cfg, result.eval_graphdef, state["params"], state["rest"], workdir, step=result.step)


def run(workdir: str, gin_files: Sequence[str], bindings: Sequence[str] = (), *, search_paths: Sequence[str] = (),
        force: bool = False, distributed: DistributedFlags = DistributedFlags(), command_line: str = "") -> int:
  """The ``attnlab train`` job; ``command_line`` heads the recorded ``config.gin``. Returns the exit status."""
  cfg = load_config(gin_files, bindings, search_paths=search_paths, distributed=distributed)
  failpoint("config")
  main = jax.process_index() == 0
  if force and jax.process_count() == 1:  # a changed config may add parameters: restore what exists, init the new
    adapted = adapt_checkpoint(cfg, workdir)
    if adapted:
      print(adapted)
  # config.gin is written only once start-up succeeded (config, data, tokenizer, state, restore), next to the run
  # record: a failed start leaves nothing that blocks the corrected rerun.
  header = f"# attnlab {command_line}\n\n"
  result, evaluation = train_and_evaluate(cfg, workdir, force=force,
                                          on_started=lambda: write_run_configs(workdir, header))
  if not main:
    return 0
  if result.status == "interrupted" and not result.history and result.step == 0:
    print(f"interrupted during start-up; nothing written to {os.path.abspath(workdir)}")
    return 0
  last = result.history[-1] if result.history else {}
  print(f"{result.status} at step {result.step}" + (f", loss {last['loss']:.4f}" if last else "") +
        f"; workdir {os.path.abspath(workdir)}")
  if evaluation and evaluation.get("heldout"):
    print(evaluation["length_extrapolation_table"])
  if evaluation and "passkey_table" in evaluation:
    print(evaluation["passkey_table"])
  return 0

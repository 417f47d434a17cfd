"""``attnlab eval``: the full evaluation of a run's newest checkpoint into ``workdir/eval.json``."""

from __future__ import annotations

import os
from collections.abc import Sequence

from attnlab.analysis.workdir import restore_step
from attnlab.app.workdir import DistributedFlags, open_workdir
from attnlab.eval.run import run_evaluation


def run(workdir: str, gin_files: Sequence[str] = (), bindings: Sequence[str] = (), *,
        search_paths: Sequence[str] = (), distributed: DistributedFlags = DistributedFlags(),
        step: int | None = None) -> int:
  """``--step N`` evaluates the kept checkpoint at N into ``workdir/eval_step<N>/eval.json``."""
  cfg = open_workdir(workdir, gin_files, bindings, search_paths=search_paths, distributed=distributed)
  step_, eval_graphdef, state = restore_step(cfg, workdir, step)
  out = workdir if step is None else os.path.join(workdir, f"eval_step{step}")
  os.makedirs(out, exist_ok=True)
  result = run_evaluation(cfg, eval_graphdef, state["params"], state["rest"], out, step=step_)
  print(result["length_extrapolation_table"])
  if "passkey_table" in result:
    print(result["passkey_table"])
  print(f"wrote {os.path.join(out, 'eval.json')}")
  return 0

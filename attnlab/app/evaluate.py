"""``attnlab eval``: the full evaluation of a run's newest checkpoint into ``workdir/eval.json``."""

from __future__ import annotations

import os
from collections.abc import Sequence

from attnlab.app.workdir import DistributedFlags, open_workdir
from attnlab.eval.run import run_evaluation
from attnlab.state import restore_state


def run(workdir: str, gin_files: Sequence[str] = (), bindings: Sequence[str] = (), *,
        search_paths: Sequence[str] = (), distributed: DistributedFlags = DistributedFlags()) -> int:
  cfg = open_workdir(workdir, gin_files, bindings, search_paths=search_paths, distributed=distributed)
  step, eval_graphdef, state = restore_state(cfg, workdir)
  result = run_evaluation(cfg, eval_graphdef, state["params"], state["rest"], workdir, step=step)
  print(result["length_extrapolation_table"])
  if "passkey_table" in result:
    print(result["passkey_table"])
  print(f"wrote {os.path.join(workdir, 'eval.json')}")
  return 0

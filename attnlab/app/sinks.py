"""``attnlab sinks``: the sink report of a run's newest checkpoint (``sinks.json`` + PNGs in its workdir)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from attnlab.analysis.workdir import format_summary, write_sink_reports
from attnlab.app.workdir import open_workdir
from attnlab.state import restore_state


def sink_report_workdir(cfg, workdir: str) -> dict:
  """Restores ``workdir``'s newest checkpoint and writes its sink report(s) (see
  :func:`attnlab.analysis.workdir.write_sink_reports`)."""
  step, eval_graphdef, state = restore_state(cfg, workdir)
  return write_sink_reports(cfg, workdir, step, eval_graphdef, state)


def run(workdir: str, gin_files: Sequence[str] = (), bindings: Sequence[str] = (), *,
        search_paths: Sequence[str] = ()) -> int:
  reports = sink_report_workdir(open_workdir(workdir, gin_files, bindings, search_paths=search_paths), workdir)
  for report in reports.values():
    if report is not None:
      print(format_summary(report))
  print(f"wrote {os.path.join(workdir, 'sinks.json')} and " + ", ".join(reports["bos"]["files"][1:]))
  return 0

"""``attnlab sinks``: the sink report of a run's checkpoint (``sinks.json``, PNGs and ``report.html``).

    attnlab sinks --workdir W [--step N] [--probe_file F] [--bos on|off|both] [--all_steps]

``--step`` picks any kept checkpoint (default: the newest), ``--probe_file`` probes your own text instead of the
run's held-out split, ``--bos`` chooses the probe with / without BOS, ``--all_steps`` adds the sink metrics over
every kept checkpoint (``W/sinks_over_steps.{json,png}``). The last line printed is the path of ``report.html``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from attnlab.analysis.workdir import (format_summary, report_dir, restore_step, sinks_over_steps, write_run_html,
                                      write_sink_reports)
from attnlab.app.workdir import open_workdir


def sink_report_workdir(cfg, workdir: str, *, step: int | None = None, probe_file: str | None = None,
                        bos: str | None = None) -> dict:
  """Restores ``workdir``'s checkpoint at ``step`` (newest by default) and writes its sink report(s) (see
  :func:`attnlab.analysis.workdir.write_sink_reports`)."""
  step_, eval_graphdef, state = restore_step(cfg, workdir, step)
  out_dir = report_dir(workdir, step=step, probe_file=probe_file)
  return write_sink_reports(cfg, workdir, step_, eval_graphdef, state, bos=bos, probe_file=probe_file,
                            out_dir=out_dir)


def run(workdir: str, gin_files: Sequence[str] = (), bindings: Sequence[str] = (), *,
        search_paths: Sequence[str] = (), step: int | None = None, probe_file: str | None = None,
        bos: str | None = None, all_steps: bool = False) -> int:
  cfg = open_workdir(workdir, gin_files, bindings, search_paths=search_paths)
  if all_steps:
    curve = sinks_over_steps(cfg, workdir, bos=bos, probe_file=probe_file, log=lambda line: print(line, flush=True))
    print("wrote " + ", ".join(os.path.join(workdir, f) for f in ["sinks_over_steps.json"] + curve["files"]))
  reports = sink_report_workdir(cfg, workdir, step=step, probe_file=probe_file, bos=bos)
  for key in ("bos", "no_bos"):
    if reports[key] is not None:
      print(format_summary(reports[key]))
      where = reports["dir"] if key == "bos" else os.path.join(reports["dir"], "sinks_no_bos")
      print("wrote " + ", ".join(os.path.join(where, f) for f in reports[key]["files"]))
  print(write_run_html(workdir, reports["dir"]))
  return 0

"""``attnlab sweep`` / ``attnlab demo``: train and analyse every arm of a sink sweep, then write the comparison table
(the sweep's layout and table: :mod:`attnlab.analysis.sweep`).

Each arm trains in ``WORKDIR/<task>/<arm>`` (in ``WORKDIR/<task>/<arm>/seed<k>`` per seed when several seeds
are given; seed ``k`` binds ``TrainConfig.seed`` and ``DataConfig.seed``) through the ordinary harness (resuming
an interrupted run, skipping a finished one that already has its ``sinks.json``), then gets its sink report.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from attnlab.analysis.sweep import (CODE_FILE, Arm, arm_name, code_version, discover, read_json, table_row,
                                    write_table)
from attnlab.analysis.workdir import NO_BOS_DIR, write_run_html, write_sink_reports
from attnlab.app.train import train_and_evaluate
from attnlab.app.workdir import load_config
from attnlab.configs import resolve_path, write_run_configs
from attnlab.train import check_workdir


def seed_bindings(seed: int) -> list[str]:
  """Seed ``seed`` of a sweep: the model's initialisation and the data (order, synthetic rows)."""
  return [f"TrainConfig.seed = {seed}", f"DataConfig.seed = {seed}"]


def arm_workdir(workdir: str, arm: Arm, seed: int, seeds: Sequence[int]) -> str:
  folder = os.path.join(workdir, arm.task, arm.name)
  return folder if len(seeds) == 1 else os.path.join(folder, f"seed{seed}")


def run_arm(arm: Arm, workdir: str, bindings: Sequence[str] = (), code: str = "", seed: int | None = None) -> dict:
  """Trains (or resumes, or reuses) one arm in ``workdir`` (at ``seed``; None: the configs' seeds) and returns its
  table row; a trained arm records the code version it ran on (``code_version.txt``, the sweep's start)."""
  bindings = [*bindings, *(seed_bindings(seed) if seed is not None else [])]
  cfg = load_config(arm.gin_files, bindings)
  check_workdir(workdir, cfg)
  report = read_json(os.path.join(workdir, "sinks.json"))
  t0 = time.perf_counter()
  trained = report is None or report.get("step") != cfg.train.steps
  if trained:
    write_run_configs(workdir, f"# attnlab sweep: {' '.join(arm.gin_files)} {' '.join(bindings)}\n\n")
    result, _ = train_and_evaluate(cfg, workdir)
    if code:
      with open(os.path.join(workdir, CODE_FILE), "w") as f:
        f.write(code + "\n")
    reports = write_sink_reports(cfg, workdir, result.step, result.eval_graphdef, result.state)
    report, no_bos = reports["bos"], reports["no_bos"]
    write_run_html(workdir)
  else:
    no_bos = read_json(os.path.join(workdir, NO_BOS_DIR, "sinks.json"))
  seconds = round(time.perf_counter() - t0, 1) if trained else None
  evaluation = read_json(os.path.join(workdir, "eval.json")) or {}
  return table_row(arm, workdir, cfg.train.steps, seconds, report, no_bos, evaluation, seed=seed)


def run_sweep(sweep_dir: str, workdir: str, *, short: bool = False, tasks: Sequence[str] | None = None,
              arms: Sequence[str] | None = None, bindings: Sequence[str] = (), seeds: Sequence[int] = (0,),
              log: Callable[[str], None] = print, command: str = "") -> tuple[list[dict], str]:
  """Runs every arm at every seed (see the module docstring); returns (rows, Markdown table). Seeds other than the
  default ``(0,)`` are bound over the configs' (:func:`seed_bindings`); a binding of ``TrainConfig.seed`` or
  ``DataConfig.seed`` beside them is an error."""
  bound = tuple(seeds) != (0,)
  if bound:
    clash = [b for b in bindings if b.replace(" ", "").startswith(("TrainConfig.seed=", "DataConfig.seed="))]
    if clash:
      raise ValueError(f"--seeds {','.join(map(str, seeds))} sets the seeds; drop the binding {clash[0]!r}")
  todo = [(arm, seed) for arm in discover(sweep_dir, short=short, tasks=tasks, arms=arms) for seed in seeds]
  code = code_version()  # the code every arm trained by this call runs on (modules are imported once)
  rows = []
  for i, (arm, seed) in enumerate(todo, 1):
    row = run_arm(arm, arm_workdir(workdir, arm, seed, seeds), bindings, code=code, seed=seed if bound else None)
    rows.append(row)
    took = f"trained in {row['seconds']:.0f} s" if row["seconds"] is not None else "reused"
    log(f"[{i}/{len(todo)}] {arm.task}/{arm_name(row)}: {took}; loss {row['loss']:.3f}, Sink_1 proxy "
        f"{row.get('sink_rate_proxy', float('nan')):.1f} %, raw {row.get('sink_rate_raw', float('nan')):.1f} %, "
        f"raw first-token weight {row.get('first_token_attn_raw', float('nan')):.2f}")
  return rows, write_table(rows, workdir, short=short, command=command)


def run(sweep_dir: str, workdir: str, *, short: bool = False, tasks: Sequence[str] | None = None,
        arms: Sequence[str] | None = None, bindings: Sequence[str] = (), seeds: Sequence[int] = (0,)) -> int:
  """The ``attnlab sweep`` job; ``sweep_dir`` may name the packaged sweep (``experiments/sinks``) from anywhere."""
  command = " ".join(["attnlab sweep", "--sweep", sweep_dir, "--workdir", workdir] + (["--short"] if short else []) +
                     ([f"--tasks {','.join(tasks)}"] if tasks else []) + ([f"--arms {','.join(arms)}"] if arms else []) +
                     [f"--gin_bindings '{b}'" for b in bindings] +
                     ([f"--seeds {','.join(map(str, seeds))}"] if tuple(seeds) != (0,) else []))
  rows, _ = run_sweep(resolve_path(sweep_dir), workdir, short=short, tasks=tasks, arms=arms, bindings=bindings,
                      seeds=seeds, log=lambda line: print(line, flush=True), command=command)
  print()
  print(compact_table(rows))
  print()
  print("wrote:")
  for name in ("sink_table.md", "sink_table.json", "sink_table.png"):
    print(f"  {os.path.join(workdir, name)}")
  for row in rows:
    print(f"  {os.path.join(row['workdir'], 'report.html')}")
  print(os.path.join(workdir, "report.html"))
  return 0


def compact_table(rows: Sequence[dict]) -> str:
  """A terminal-width summary (the full table is in sink_table.md and report.html)."""
  lines = [f"{'task/arm':32s} {'loss':>7s} {'Sink1 raw%':>10s} {'proxy%':>7s} {'w(tok1)':>8s}"]
  for r in rows:
    lines.append(f"{r['task'] + '/' + arm_name(r):32s} {r['loss']:7.3f} {r.get('sink_rate_raw', float('nan')):10.1f} "
                 f"{r.get('sink_rate_proxy', float('nan')):7.1f} {r.get('first_token_attn_raw', float('nan')):8.2f}")
  return "\n".join(lines)

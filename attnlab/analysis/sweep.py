"""The sink-reproduction sweep's arms and its comparison table (``attnlab sweep`` runs it: :mod:`attnlab.app.sweep`).

A sweep directory holds one folder per task with one gin file per arm (``experiments/sinks/bb/softmax.gin``,
``experiments/sinks/text/relu.gin``, ...); a task folder's ``_short.gin`` holds the overrides of ``--short``.
A ``<task>/_short_<arm>.gin`` is applied after ``_short.gin`` for that arm only (per-arm learning rates).
Each arm trains in ``WORKDIR/<task>/<arm>`` and gets its sink report (:mod:`attnlab.analysis.workdir`); its
table row is :func:`table_row`.
The comparison goes to ``WORKDIR/sink_table.{md,json,png}``: final loss, Gu's ``Sink_1^0.3`` on the proxy AND on
the raw weights, raw first-token weight and row mass, learned-sink mass, value-norm and hidden-norm ratios, the
published number where there is one (:mod:`attnlab.analysis.paper`), and notes that name every disagreement
(proxy vs raw, ours vs the paper).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import subprocess
from collections.abc import Sequence

import numpy as np

from attnlab.analysis import figures, html
from attnlab.analysis.paper import GU_SETUP, PAPER, paper_cell

SHORT_FILE = "_short.gin"
TABLE = "sink_table"
# Table order and labels of the known arms; other arms follow alphabetically under their file names.
ARM_LABELS = {
    "softmax": "softmax",
    "sigmoid_b0": "σ(s), b = 0 (Gu's sigmoid w/o norm)",
    "sigmoid_logn": "σ(s − log n) (Ramapuram et al.)",
    "sigmoid_norm": "σ(s) row-normalised (Gu's sigmoid w/ norm)",
    "relu": "ReLU/n (Guo et al.)",
    "key_bias": "softmax + key bias, v = 0",
    "sink_token": "softmax + learnable sink token",
    "sink_logit": "softmax + per-head sink logit",
    "gated": "softmax + output gate",
    "softpick": "softpick",
    "softplus": "softplus (LSSA)",
}
TASK_LABELS = {"bb": "Bigram-Backcopy (1 layer, 1 head, d 64, T 64)",
               "text": "embedded-corpus byte LM (2 layers, 4 heads, d 64, T 64)"}


@dataclasses.dataclass(frozen=True)
class Arm:
  task: str
  name: str
  gin_files: tuple[str, ...]  # the arm's file, then the task's _short.gin with --short


def discover(sweep_dir: str, *, short: bool = False, tasks: Sequence[str] | None = None,
             arms: Sequence[str] | None = None) -> list[Arm]:
  """The arms of ``sweep_dir`` (``<task>/<arm>.gin``), in table order, filtered by ``tasks`` / ``arms``."""
  if not os.path.isdir(sweep_dir):
    raise ValueError(f"sweep directory {sweep_dir!r} does not exist")
  found = sorted(d for d in os.listdir(sweep_dir) if glob.glob(os.path.join(sweep_dir, d, "*.gin")))
  if tasks:
    missing = sorted(set(tasks) - set(found))
    if missing:
      raise ValueError(f"unknown task(s) {missing} in {sweep_dir!r}; found {found}")
    found = [t for t in found if t in tasks]
  order = list(ARM_LABELS)
  out = []
  for task in found:
    folder = os.path.join(sweep_dir, task)
    names = [os.path.basename(f)[:-4] for f in glob.glob(os.path.join(folder, "*.gin"))]
    names = sorted((n for n in names if not n.startswith("_")),
                   key=lambda n: (order.index(n) if n in order else len(order), n))
    short_file = os.path.join(folder, SHORT_FILE)
    if short and not os.path.isfile(short_file):
      raise ValueError(f"--short needs {short_file}")
    for name in names:
      if arms and name not in arms:
        continue
      arm_short = os.path.join(folder, f"_short_{name}.gin")  # per-arm overrides of --short (e.g. a learning rate)
      files = (os.path.join(folder, name + ".gin"),) + ((short_file,) if short else ()) + (
          (arm_short,) if short and os.path.isfile(arm_short) else ())
      out.append(Arm(task, name, files))
  if arms:
    missing = sorted(set(arms) - {a.name for a in out})
    if missing:
      raise ValueError(f"unknown arm(s) {missing} in {sweep_dir!r}")
  if not out:
    raise ValueError(f"no arms found in {sweep_dir!r} (expected <task>/<arm>.gin files)")
  return out


def read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def table_row(arm: Arm, workdir: str, steps: int, seconds: float | None, report: dict, no_bos: dict | None,
              evaluation: dict, seed: int | None = None) -> dict:
  """One arm's table row from its sink reports (with and without BOS) and its ``eval.json``; ``seed``: the sweep
  seed it trained at (None: the configs' own)."""
  row = {"task": arm.task, "arm": arm.name, "label": ARM_LABELS.get(arm.name, arm.name), "seed": seed,
         "workdir": workdir, "steps": steps, "seconds": seconds, "probe_seq": report["probe"]["seq"],
         "loss": (evaluation.get("heldout") or {}).get("loss", float("nan")), **report["summary"],
         **{f"probe_{k}": v for k, v in report.get("probe_loss", {}).items()},
         "learned_sink": any(a.get(f) for a in report.get("attention", []) for f in ("sink_logit", "sink_token",
                                                                                      "key_bias"))}
  if no_bos is not None:
    row["no_bos_sink_rate_proxy"] = no_bos["summary"].get("sink_rate_proxy")
    row["no_bos_sink_rate_raw"] = no_bos["summary"].get("sink_rate_raw")
  row["code"] = read_text(os.path.join(workdir, CODE_FILE))
  row["notes"] = notes(row)
  return row


CODE_FILE = "code_version.txt"


def arm_name(row: dict) -> str:
  """``softmax`` or, for a row of a several-seed sweep, ``softmax seed 1``."""
  return row["arm"] if row.get("seed") is None else f"{row['arm']} seed {row['seed']}"


def several_seeds(rows: Sequence[dict]) -> bool:
  return len({r.get("seed") for r in rows}) > 1


def read_text(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read().strip() or None
  except OSError:
    return None


def notes(row: dict) -> list[str]:
  """Plain-words flags: where the proxy and the raw weights disagree, where the mass went, and where our number
  disagrees with the paper's."""
  out = []
  proxy, raw = row.get("sink_rate_proxy", 0.0), row.get("sink_rate_raw", 0.0)
  first, mass, sink = row.get("first_token_attn_raw", 0.0), row.get("row_mass", 1.0), row.get("sink_mass", 0.0)
  if proxy - raw >= 25.0:
    why = f"the head switched off (raw row mass {mass:.2f})" if mass < 0.9 else f"raw Sink_1 {raw:.0f} %"
    out.append(f"PROXY SAYS SINK ({proxy:.0f} %), RAW WEIGHTS DO NOT: {why}")
  if raw - proxy >= 25.0:
    out.append(f"RAW SAYS SINK ({raw:.0f} %), PROXY DOES NOT: unnormalised weights >= 0.3 on many keys (row mass "
               f"{mass:.2f}), not a concentration on token 1")
  if raw >= 50.0:
    out.append(f"first-token sink on raw weights ({first:.2f} of each row)" +
               (f", row mass {mass:.2f} (unnormalised)" if abs(mass - 1.0) > 0.05 else ""))
  if sink >= 0.3:
    out.append(f"mass parked on the learned sink ({sink:.2f}) instead of token 1")
  elif row.get("learned_sink") and raw >= 50.0:
    out.append(f"LEARNED SINK UNUSED (mass {sink:.2f}): the sink stayed on token 1")
  paper = PAPER.get(row["arm"], {})
  if "sink_1" in paper:
    ours = proxy if paper.get("proxy") else raw
    if (paper["sink_1"] < 5.0 and ours >= 30.0) or (paper["sink_1"] >= 10.0 and ours < 5.0):
      out.append(f"DISAGREES WITH THE PAPER: {paper['sink_1']:.2f} % there, {ours:.0f} % here")
  return out


def _fmt(x, spec: str = ".2f") -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "—"
  return format(x, spec)


def format_table(rows: Sequence[dict], *, short: bool = False) -> str:
  """Markdown: one table per task, with the paper's numbers and the notes beside ours."""
  parts = []
  for task in dict.fromkeys(r["task"] for r in rows):
    trs = [r for r in rows if r["task"] == task]
    has_bc = any("probe_ce_unmasked" in r for r in trs)
    has_nobos = any("no_bos_sink_rate_proxy" in r for r in trs)
    has_seed = several_seeds(trs)
    head = ["arm"] + (["seed"] if has_seed else []) + ["loss"] + (["backcopy CE"] if has_bc else []) + [
        "Sink_1^0.3 proxy %", "Sink_1^0.3 raw %"] + (["Sink_1 proxy, no BOS %"] if has_nobos else []) + [
        "raw first-token weight", "raw row mass", "learned-sink mass", "‖v_1‖/mean‖v‖", "‖h_1‖/mean‖h‖ (max)",
        "paper: Sink_1 % / loss", "notes"]
    steps = sorted({r["steps"] for r in trs})
    lines = [f"**{TASK_LABELS.get(task, task)}**, {'/'.join(map(str, steps))} steps"
             f"{' (--short)' if short else ''}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in trs:
      cells = [r["label"]] + ([str(r["seed"])] if has_seed else []) + [_fmt(r["loss"], ".3f")]
      cells += [_fmt(r.get("probe_ce_unmasked"), ".3f")] if has_bc else []
      cells += [_fmt(r.get("sink_rate_proxy"), ".1f"), _fmt(r.get("sink_rate_raw"), ".1f")]
      cells += [_fmt(r.get("no_bos_sink_rate_proxy"), ".1f")] if has_nobos else []
      cells += [_fmt(r.get("first_token_attn_raw")), _fmt(r.get("row_mass")), _fmt(r.get("sink_mass")),
                _fmt(r.get("value_norm_ratio")), _fmt(r.get("massive_ratio")), paper_cell(r["arm"]),
                "; ".join(r["notes"])]
      lines.append("| " + " | ".join(cells) + " |")
    parts.append("\n".join(lines))
  legend = (f"Loss: held-out next-token CE (nats; per byte for text). Sink_1^0.3: % of (sequence, layer, head) "
            f"whose first token gets mean weight > 0.3 (Gu et al.); proxy = weights renormalised per row, raw = the "
            f"weights themselves. Raw first-token weight and row mass: mean over queries (BB: non-trigger queries). "
            f"Paper: {GU_SETUP}; * = proxy score; 3rd-party = from a secondary summary, not checked against the paper.")
  return "\n\n".join(parts) + "\n\n" + legend + "\n"


def plot_table(rows: Sequence[dict], path: str) -> str:
  """Per task: Sink_1 (%) on the proxy and on raw weights; and the raw first-token weight and learned-sink mass
  (0-1) with the uniform-attention reference. One quantity per axis, legends outside the bars."""
  plt = figures._plt()
  tasks = list(dict.fromkeys(r["task"] for r in rows))
  fig, axes = plt.subplots(len(tasks), 2, figsize=(15, 3.6 * len(tasks)), squeeze=False)
  panels = (((("sink_rate_proxy", "Gu proxy"), ("sink_rate_raw", "raw weights")), "Sink$_1^{0.3}$ (% of heads)",
             (0, 100)),
            ((("first_token_attn_raw", "raw weight on token 1"), ("sink_mass", "weight on the learned sink (arms with one)")),
             "attention weight (0-1)", (0, 1)))
  for row_axes, task in zip(axes, tasks):
    trs = [r for r in rows if r["task"] == task]
    x = np.arange(len(trs))
    for ax, (series, ylabel, ylim) in zip(row_axes, panels):
      for i, (key, label) in enumerate(series):
        shown = [key != "sink_mass" or bool(r.get("learned_sink")) for r in trs]  # no slot: no bar, no label
        if not any(shown):
          continue
        vals = [(r.get(key) or 0.0) if ok else 0.0 for r, ok in zip(trs, shown)]
        bars = ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, label=label)
        fmt = "{:.0f}" if ylim[1] == 100 else "{:.2f}"
        ax.bar_label(bars, labels=[fmt.format(v) if ok else "" for v, ok in zip(vals, shown)], fontsize=6, padding=1)
      if ylim == (0, 1):
        seq = trs[0].get("probe_seq", 64)
        ax.axhline(figures.uniform_first_token_weight(seq), color="gray", ls=":", lw=1,
                   label=f"uniform attention (T = {seq})")
      ax.set_xticks(x, [arm_name(r) for r in trs], rotation=30, ha="right", fontsize=8)
      ax.set(ylim=(0, ylim[1] * 1.08), ylabel=ylabel, title=TASK_LABELS.get(task, task))
      ax.set_yticks(np.linspace(0, ylim[1], 6))
      ax.title.set_fontsize(9)
      figures._legend_outside(ax)
  fig.tight_layout()
  return figures._save(fig, path)


def write_sweep_html(rows: Sequence[dict], workdir: str, md: str, *, command: str = "") -> str:
  """``workdir/report.html``: the comparison table, its figure, a link to every arm's report and the JSON."""
  body = []
  if command:
    body.append(f"<p>Command: <code>{html.esc(command)}</code></p>")
  body += ["<h2>Comparison</h2>", html.markdown_table(md),
           html.figure(TABLE + ".png", "Sink_1 (%) and first-token / learned-sink weights per arm.")]
  body.append("<h2>Arms</h2>")
  arm_rows = []
  for r in rows:
    rep = os.path.join(r["workdir"], "report.html")
    arm_rows.append((f"{r['task']}/{r['arm']}: report", html.rel(rep, workdir)))
    cfg = os.path.join(r["workdir"], "operative_config.gin")
    if os.path.exists(cfg):
      arm_rows.append((f"{r['task']}/{r['arm']}: operative config", html.rel(cfg, workdir)))
  body.append(html.links(html.existing(workdir, [(label, os.path.join(workdir, href)) for label, href in arm_rows])))
  body += ["<h2>Files</h2>", html.links(html.existing(workdir, [(TABLE + ".json", os.path.join(workdir, TABLE + ".json")),
                                                                 (TABLE + ".md", os.path.join(workdir, TABLE + ".md"))]))]
  return html.write(os.path.join(workdir, "report.html"), f"attnlab sink sweep: {os.path.abspath(workdir)}", body)


def code_version() -> str:
  """Id of the attnlab checkout (``<commit>[-dirty]``, dirty = uncommitted changes under attnlab/ or
  experiments/), or "" outside git. A sweep records it per arm when the arm trains (``code_version.txt``)."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "-C", here, "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                            timeout=10, check=True).stdout.strip()
    root = os.path.dirname(os.path.dirname(here))
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", "attnlab",
                            "experiments"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""
  return commit + ("-dirty" if dirty else "")


def write_table(rows: Sequence[dict], workdir: str, *, short: bool = False, command: str = "") -> str:
  """Writes ``sink_table.md/.json/.png`` and ``report.html`` to ``workdir``; returns the Markdown."""
  os.makedirs(workdir, exist_ok=True)
  md = format_table(rows, short=short)
  with open(os.path.join(workdir, TABLE + ".md"), "w") as f:
    f.write(md)
  with open(os.path.join(workdir, TABLE + ".json"), "w") as f:
    codes = sorted({r["code"] for r in rows if r.get("code")})
    json.dump({"short": short, "command": command, "code": ", ".join(codes) or code_version(),
               "paper_setup": GU_SETUP, "paper": PAPER, "rows": list(rows)}, f, indent=1)
  plot_table(rows, os.path.join(workdir, TABLE + ".png"))
  write_sweep_html(rows, workdir, md, command=command)
  return md
